"""--share-prompt (common.pack_shared tree rows): one GRPO update equals the plain path's (one prompt copy per
response) in per-token log-probs, loss and every parameter gradient, on real ALFWorld world-model prompts with
G = 8 ragged responses; and under torchrun, 2 ranks sharing equal 1 rank not sharing."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import DRIVER, HALF_VOCAB, ROOT, metrics, small, toy_reward, weights, write_triples

import bench_step
import common
import prompts
import train_rwml

FIXTURES = ROOT / "tests" / "fixtures" / "alfworld"
G = 8


@pytest.fixture(scope="module")
def wm_prompts():
    """World-model prompt ids of real triples: the fixture train games played along gold actions (history 2)."""
    tok = common.load_tokenizer("smollm2-135m")
    return [common.chat_ids(tok, prompts.wm_messages(t)) for t in bench_step.alfworld_triples(2, str(FIXTURES))]


def make_seqs(prompt_ids: list[list[int]], singles: int = 0) -> list[dict]:
    """G ragged random responses per prompt (1..40 tokens), sampler log-probs and advantages at random; `singles`
    more sequences whose prompts appear once (policy steps: nothing to share)."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for k, p in enumerate(prompt_ids):
        for j in range(G):
            n = 1 if j == 0 else int(torch.randint(2, 41, (1,), generator=g))
            seqs.append({"prompt_ids": p, "response_ids": torch.randint(0, 49152, (n,), generator=g).tolist(),
                         "logprobs": (-3 * torch.rand(n, generator=g)).tolist(),
                         "adv": float(torch.randn(1, generator=g))})
    for k in range(singles):
        p = prompt_ids[k % len(prompt_ids)][:-(k + 2)]
        n = int(torch.randint(2, 20, (1,), generator=g))
        seqs.append({"prompt_ids": p, "response_ids": torch.randint(0, 49152, (n,), generator=g).tolist(),
                     "logprobs": [-1.0] * n, "adv": float(torch.randn(1, generator=g))})
    return seqs


def one_update(model: str, seqs: list[dict], share: bool, lora: bool, ckpt: bool, micro_batch: int):
    """One grpo_update (entropy bonus, k2 KL to a perturbed reference, temperature 0.7); -> (stats, per-sequence
    log-probs and entropies keyed by (prompt, response), gradient of every trainable parameter)."""
    lm, tok = common.load_model(model)
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for p in ref.parameters():
            p.add_(1e-2 * p.std() * torch.randn_like(p))
        if lora:
            from peft import LoraConfig, get_peft_model
            lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            for name, p in lm.named_parameters():
                if "lora_B" in name:      # peft starts B at 0: A's gradient would be 0 on both paths
                    p.normal_(0, 0.02)
    if ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    policy_logprobs, reference_logprobs = common.TokenLogprobs(lm), common.TokenLogprobs(ref)
    s = train_rwml.Settings(share_prompt=share, micro_batch=micro_batch, beta=0.05, kl="k2", entropy_coef=0.01,
                            temperature=0.7, grad_clip=0.0, lora_rank=4 if lora else 0)
    named = [(n, p) for n, p in policy_logprobs.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.SGD(params, lr=0.0)
    grads = {}
    optimizer.register_step_pre_hook(lambda *a: grads.update((n, p.grad.clone()) for n, p in named))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    d = common.Dist()
    stats = train_rwml.grpo_update(seqs, policy_logprobs, reference_logprobs, params, optimizer, scheduler, s, d,
                                   tok.pad_token_id)
    per_seq = {}
    with torch.no_grad():
        for mb in train_rwml.micro_batches(seqs, s, d, tok.pad_token_id):
            logp, ent, _ = train_rwml.micro_batch_logprobs(policy_logprobs, mb, s.temperature, with_entropy=True)
            resp = mb["ids"].flatten()[mb["index"]] if share else mb["ids"]
            for b in range(logp.shape[0]):
                m = mb["mask"][b]
                per_seq[tuple(resp[b][m].tolist())] = (logp[b][m], ent[b][m])
    assert len(grads) == len(named)
    return stats, per_seq, grads


def assert_same_update(model, seqs, lora, ckpt, micro_batch):
    plain = one_update(model, seqs, False, lora, ckpt, micro_batch)
    shared = one_update(model, seqs, True, lora, ckpt, micro_batch)
    (st_a, lp_a, g_a), (st_b, lp_b, g_b) = plain, shared
    assert lp_a.keys() == lp_b.keys() and len(lp_a) == len(seqs)
    for k in lp_a:
        for x, y in zip(lp_a[k], lp_b[k]):
            assert (x - y).abs().max() <= 1e-5 * x.abs().max().clamp(min=1.0), k
    for key in ("loss", "grad_norm", "agree_mean", "agree_max", "entropy"):
        assert st_b[key] == pytest.approx(st_a[key], rel=1e-5, abs=1e-7), key
    # k2 KL = mean (logp - ref)^2 / 2 of small differences: 1e-6 in logp is ~1e-5 of it (seen on SmolLM2: 1.4e-5)
    assert st_b["kl"] == pytest.approx(st_a["kl"], rel=1e-4)
    assert st_a["train_tokens"] == st_b["train_tokens"]
    worst = max(float((g_a[n] - g_b[n]).norm() / g_a[n].norm().clamp(min=1e-30)) for n in g_a)
    assert worst <= 1e-5, worst
    assert all(g_a[n].abs().max() > 0 for n in g_a if "lora_A" in n or not lora)   # gradients that can differ
    return st_a, st_b


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["", "ckpt"])
@pytest.mark.parametrize("micro_batch", [5, 32])
def test_shared_update_equals_plain_tiny(wm_prompts, lora, ckpt, micro_batch):
    """micro_batch 5 splits each group of 8 (each part carries the prompt); 32 puts both groups and the singles in
    one pass. The singles are sets of one (a policy step's prompt): the same tree row as a plain sequence."""
    st_a, st_b = assert_same_update("tiny", make_seqs(wm_prompts, singles=3), lora, ckpt, micro_batch)
    assert st_b["train_tokens_computed"] < st_a["train_tokens_computed"] / 2


@pytest.mark.slow
@pytest.mark.parametrize("lora_ckpt", [False, True], ids=["full", "lora+ckpt"])
def test_shared_update_equals_plain_smollm2(wm_prompts, lora_ckpt):
    """One prompt's group of 8 (about 3 min a case on one CPU core; the tiny cases cover several rows)."""
    assert_same_update("smollm2-135m", make_seqs(wm_prompts[:1]), lora_ckpt, lora_ckpt, 8)


def same_step(a: dict, b: dict) -> None:
    """Two runs' first step: same samples, loss and gradient norm. Their weights may differ only where Adam's
    first step (about lr * sign(g)) meets a gradient at rounding-noise size, whose sign the summation order decides
    (seen: 3 of 10^6 elements); a wrong gradient would move most elements differently."""
    assert a["reward_mean"] == b["reward_mean"] and a["train_tokens"] == b["train_tokens"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
    assert b["agree_mean"] == pytest.approx(a["agree_mean"], abs=1e-7)
    assert b["train_tokens_computed"] < a["train_tokens_computed"] / 2


def few_differ(a: dict, b: dict) -> None:
    moved = sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in a)
    assert moved <= 1e-4 * sum(v.numel() for v in a.values()), moved


def test_training_run_shared_equals_plain(tmp_path, monkeypatch):
    """train_rwml.main end to end (generation, an Adam step): --share-prompt and --no-share-prompt make the same
    update (micro-batch 5 splits every group of 8). One step: the next step samples from the updated weights, and
    Adam's rounding-level differences would change the samples."""
    triples = write_triples(tmp_path / "triples.jsonl")
    toy_reward(monkeypatch)
    args = ["--lr", "1e-2", "--max-steps", "1", "--micro-batch", "5", "--beta", "0.05", "--entropy-coef", "0.01"]
    train_rwml.main(small("tiny", triples, tmp_path / "plain", *args, "--no-share-prompt"))
    train_rwml.main(small("tiny", triples, tmp_path / "shared", *args))
    same_step(metrics(tmp_path / "plain")[0], metrics(tmp_path / "shared")[0])
    few_differ(weights(tmp_path / "plain/ckpt/step_000001"), weights(tmp_path / "shared/ckpt/step_000001"))


@pytest.mark.slow
def test_torchrun_two_ranks_shared_match_one_process_plain(tmp_path, monkeypatch):
    """FSDP2 on gloo, 2 ranks with --share-prompt (micro-batch 5: every group split) == 1 process without."""
    triples = write_triples(tmp_path / "triples.jsonl")
    args = ["--lr", "1e-2", "--max-steps", "1", "--gen-chunk", "2", "--micro-batch", "5", "--beta", "0.01"]
    toy_reward(monkeypatch)
    train_rwml.main(small("tiny", triples, tmp_path / "one", *args, "--no-share-prompt"))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), half=HALF_VOCAB))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), *small("tiny", triples, tmp_path / "two", *args, "--share-prompt")],
                          check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    same_step(metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0])
    few_differ(weights(tmp_path / "one/ckpt/step_000001"), weights(tmp_path / "two/ckpt/step_000001"))
