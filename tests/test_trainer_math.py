"""Tests a wrong trainer cannot pass: grpo_update against the GRPO objective written out in plain PyTorch (1 and
2 ranks), truncated IS weights that change the update, a reference model that stays frozen, each multi-turn
sample carrying its own episode's advantage, and the bf16 precision recipe on CPU."""
import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
from helpers import metrics, one_thread, small, toy_reward, write_triples  # noqa: F401 -- one_thread: autouse
from safetensors.torch import load_file

import common
import rewards
import rollout
import train_rwml
from kernels import group_advantages

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def batch():
    lm, ref = helpers.make_models()
    return lm, ref, helpers.make_seqs(lm)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def test_grpo_update_equals_the_plain_grpo_objective_and_tis_changes_it(batch):
    """Two SGD steps (the second with a clipped ratio) with and without TIS: the parameters grpo_update leaves
    equal the plain full-batch objective's, and the TIS weights (some capped) move them elsewhere."""
    lm, ref, seqs = batch
    base = dict(lm.named_parameters())
    out = {}
    for cap in (2.0, 0.0):
        s = helpers.grpo_settings(cap)
        want = helpers.reference_update(lm, ref, seqs, s)
        trained = copy.deepcopy(lm)
        stats = helpers.run_grpo_update(trained, ref, seqs, s, common.Dist())
        got = dict(trained.named_parameters())
        assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0 and stats["kl"] > 0   # all terms live
        moved = max_diff(want, base)
        assert moved > 0.1 and max_diff(want, got) < 1e-5 * moved, (moved, max_diff(want, got))
        out[cap] = got
        if cap:
            assert 0 < stats["tis_capped_frac"] < 1 and stats["tis_weight_mean"] != 1.0
    assert max_diff(out[2.0], out[0.0]) > 100 * 1e-5 * moved


def test_first_update_skips_the_reference_forward_and_changes_nothing(batch):
    """While the policy has the reference's weights (a fresh run's first update), the reference's log-probs are
    the policy's own: grpo_update with policy_is_reference never runs the reference model and leaves the same
    parameters and KL as the update that does (two epochs: the second reads the reference's log-probs too)."""
    lm, _, seqs = batch
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    calls = []
    counting = common.TokenLogprobs(ref)
    counting.register_forward_hook(lambda *_: calls.append(1))
    s = helpers.grpo_settings(0.0)
    out = {}
    for same in (False, True):
        trained = copy.deepcopy(lm)
        policy_logprobs = common.wrap_for_training(trained, common.Dist())
        params = [p for p in trained.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=s.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        n_before = len(calls)
        stats = train_rwml.grpo_update(seqs, policy_logprobs, counting, params, opt, sched, s, common.Dist(),
                                       pad_id=0, policy_is_reference=same)
        assert (len(calls) == n_before) == same, (same, len(calls) - n_before)
        out[same] = (dict(trained.named_parameters()), stats["kl"])
    moved = max_diff(out[False][0], dict(lm.named_parameters()))
    assert moved > 0.1 and max_diff(out[True][0], out[False][0]) < 1e-6 * moved
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5, abs=1e-9) and out[False][1] > 0


def test_the_reference_forward_is_skipped_until_the_first_optimizer_step(tmp_path, monkeypatch, triples):
    """Step 1's groups all score the same and are dropped (no optimizer step), so step 2 still starts from the
    reference's weights and skips its forward; step 3 (after step 2's update) runs it."""
    calls = iter(range(1000))

    def constant_first(samples, triples):   # the first step's rewards are all 0: every group zero-variance
        return helpers.half_vocab_reward(samples, triples) * (next(calls) > 0)
    toy_reward(monkeypatch, constant_first)
    seen, grpo_update = [], train_rwml.grpo_update

    def spy(*a, policy_is_reference=False, **kw):
        seen.append(policy_is_reference)
        return grpo_update(*a, policy_is_reference=policy_is_reference, **kw)
    monkeypatch.setattr(train_rwml, "grpo_update", spy)
    train_rwml.main(small("tiny", triples, tmp_path, "--max-steps", "3", "--lr", "1e-2", "--beta", "0.1",
                          "--group-size", "4", "--max-new-tokens", "6", "--drop-zero-var"))
    rows = metrics(tmp_path)
    assert rows[0]["zero_var_frac"] == 1.0 and "train_seqs" not in rows[0] and rows[2]["kl"] > 1e-4, rows
    assert seen == [True, True, False]


def loss_and_grad(mb: dict, logp: torch.Tensor, entropy: torch.Tensor, s, dtype) -> tuple[float, torch.Tensor, dict]:
    """train_rwml.grpo_loss on one micro-batch cast to dtype -> (loss, d loss / d logp, stats)."""
    mb = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in mb.items()}
    x = logp.detach().to(dtype).clone().requires_grad_()
    loss, sums = train_rwml.grpo_loss(x, entropy.to(dtype), mb, s, n_tok=300.0, n_seq=9.0, world=2)
    loss.backward()
    return loss.item(), x.grad.double(), {k: float(v) for k, v in sums.items()}


@pytest.mark.parametrize("tis", [False, True], ids=["", "tis"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_fused_loss_equals_the_pytorch_loss(monkeypatch, agg, kl, tis):
    """--fused-loss on (kernels.grpo_loss: the Triton kernel, interpreted here) and off (grpo_loss's PyTorch code)
    give the loss and d loss / d logp of the PyTorch code in float64, with the global normaliser (a micro-batch of
    5 of a step's 9 sequences, 2 ranks), the entropy bonus, and ratios beyond the clip and the exp clamp."""
    monkeypatch.setenv("RWML_KERNELS", "triton")
    g = torch.Generator().manual_seed(3)
    b, t = 5, 37
    mask = torch.arange(t)[None] < torch.tensor([37, 37, 20, 3, 11])[:, None]
    logp = torch.where(mask, -3 * torch.rand(b, t, generator=g, dtype=torch.float64), 0.0)
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    old[:2, :4] = logp[:2, :4] - torch.tensor([30.0, 2.0, -2.0, -0.1], dtype=torch.float64)
    mb = {"old": torch.where(mask, old, 0.0), "mask": mask, "weight": 1.0,
          "ref": torch.where(mask, logp + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64), 0.0),
          "adv": torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9], dtype=torch.float64)}
    if tis:
        mb["isw"] = torch.where(mask, 2 * torch.rand(b, t, generator=g, dtype=torch.float64), 0.0)
    entropy = torch.where(mask, 4 * torch.rand(b, t, generator=g, dtype=torch.float64), 0.0)
    s = train_rwml.Settings(agg=agg, kl=kl, beta=0.1, entropy_coef=0.01, clip_low=0.2, clip_high=0.28,
                            max_new_tokens=48, fused_loss="off")
    loss64, grad64, sums64 = loss_and_grad(mb, logp, entropy, s, torch.float64)
    assert grad64.abs().max() > 0 and sums64["clipped_low"] + sums64["clipped_high"] > 0
    for fused in ("off", "on"):
        loss, grad, sums = loss_and_grad(mb, logp, entropy, dataclasses.replace(s, fused_loss=fused), torch.float32)
        assert abs(loss - loss64) <= 1e-6 * max(1.0, abs(loss64)), (fused, loss, loss64)
        assert float((grad - grad64).norm() / grad64.norm()) <= 1e-6, fused
        assert torch.all(grad[~mask] == 0) and sums.keys() == sums64.keys()
        assert all(abs(sums[k] - sums64[k]) <= 1e-5 * max(1.0, abs(sums64[k])) for k in sums), (sums, sums64)


@pytest.mark.slow
def test_two_ranks_grpo_update_equals_the_plain_objective_and_refuse_incomplete_checkpoints(tmp_path, batch):
    """FSDP2 on gloo, each rank half the batch: the same parameters as the objective on the whole batch (a
    divide-by-world error or a per-rank normaliser fails), and load_checkpoint refuses a checkpoint with a
    weight missing (FSDP2's set_model_state_dict would quietly keep the model's own value)."""
    lm, ref, seqs = batch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "helpers.py"), str(tmp_path)],
                          check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "params.pt", weights_only=True)
    want = helpers.reference_update(lm, ref, seqs, helpers.grpo_settings(2.0))
    moved = max_diff(want, dict(lm.named_parameters()))
    assert max_diff(want, got["params"]) < 1e-5 * moved, (moved, max_diff(want, got["params"]))
    verdict = (tmp_path / "load_verdict.txt").read_text()
    assert verdict.startswith("refused") and "model.layers.0.mlp.up_proj.weight" in verdict, verdict


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    return write_triples(tmp_path_factory.mktemp("data") / "triples.jsonl", n=4)


def test_reference_model_stays_frozen(tmp_path, monkeypatch, triples):
    """Reference = start model: KL exactly 0 at step 1 (same weights, same computation), then > 0 once the
    policy has moved. A reference that follows the policy (shared or synced) keeps it at 0."""
    toy_reward(monkeypatch)
    train_rwml.main(small("tiny", triples, tmp_path, "--max-steps", "3", "--lr", "1e-2", "--beta", "0.1",
                          "--group-size", "4", "--max-new-tokens", "6"))
    kl = [r["kl"] for r in metrics(tmp_path)]
    assert kl[0] == 0.0 and kl[1] > 1e-4 and kl[2] > 1e-4, kl


def test_each_env_step_sample_carries_its_episodes_advantage(tmp_path, monkeypatch):
    """--task policy: every step of episode e is a sample with advantage adv[e] (group-normalised over its G
    episodes), not another episode's."""
    rewards_given = iter([0.0, 1.0, 4.0, 9.0, 16.0, 25.0, 36.0, 49.0])   # distinct advantages (adv-scale none)
    # an episode's group reward is the sum of its step rewards: one number per episode here
    monkeypatch.setattr(rewards, "policy_step_rewards", lambda *a: [next(rewards_given)])
    seen = {}
    run_episodes, grpo_update = rollout.run_episodes, train_rwml.grpo_update

    def spy_episodes(*a, **kw):
        seen["episodes"] = run_episodes(*a, **kw)
        return seen["episodes"]

    def spy_update(seqs, *a, **kw):
        seen["seqs"] = seqs
        return grpo_update(seqs, *a, **kw)
    monkeypatch.setattr(rollout, "run_episodes", spy_episodes)
    monkeypatch.setattr(train_rwml, "grpo_update", spy_update)
    train_rwml.main(["--task", "policy", "--env", "twx", "--model", "tiny", "--out-dir", str(tmp_path),
                     "--prompts-per-step", "2", "--group-size", "2", "--max-env-steps", "3", "--adv-scale", "none",
                     "--max-new-tokens", "6", "--max-steps", "1", "--lr", "1e-3", "--micro-batch", "16"])
    episodes, seqs = seen["episodes"], seen["seqs"]
    adv = group_advantages(torch.tensor([0.0, 1.0, 4.0, 9.0]), 2, "none")
    expected = {id(st["sample"].response_ids): float(adv[e]) for e, ep in enumerate(episodes) for st in ep["steps"]}
    assert len(seqs) == len(expected) == sum(len(ep["steps"]) for ep in episodes)
    assert sorted(id(q["response_ids"]) for q in seqs) == sorted(expected)
    assert all(q["adv"] == expected[id(q["response_ids"])] for q in seqs)
    assert len({q["adv"] for q in seqs}) == 4


def test_bf16_precision_recipe_on_cpu(tmp_path, monkeypatch, triples):
    """--precision bf16 in one process: fp32 master weights that move, a bf16 compute copy that is the
    generation model and follows every optimizer step (the second ppo epoch sees moved log-probs; step-1 KL
    exactly 0: trainer and reference compute alike; step 2 > 0), and an update close to the fp32 recipe's."""
    toy_reward(monkeypatch)
    args = ["--max-steps", "2", "--lr", "1e-2", "--beta", "0.1", "--group-size", "4", "--max-new-tokens", "6",
            "--tis-cap", "2", "--save-every", "1", "--ppo-epochs", "2"]
    train_rwml.main(small("tiny", triples, tmp_path / "bf16", *args, "--precision", "bf16"))
    train_rwml.main(small("tiny", triples, tmp_path / "fp32", *args))
    rows = metrics(tmp_path / "bf16")
    assert abs(rows[0]["ratio_mean"] - 1) > 1e-4 and rows[1]["kl"] > 1e-4, rows[0]["ratio_mean"]
    assert rows[0]["agree_max"] < 0.5 and rows[1]["agree_max"] < 0.5   # at most bf16 rounding
    assert "tis_capped_frac" in rows[0]
    assert common.read_jsonl(tmp_path / "fp32" / "metrics.jsonl")[0]["agree_max"] < 1e-4
    base, _ = common.load_model("tiny")
    b16, f32 = load_file(tmp_path / "bf16/ckpt/step_000001/model.safetensors"), \
        load_file(tmp_path / "fp32/ckpt/step_000001/model.safetensors")
    assert all(v.dtype == torch.float32 for v in b16.values())
    step = {k: b16[k] - base.state_dict()[k] for k in b16}   # Adam: ~lr x sign(gradient) per weight
    ref_step = {k: f32[k] - base.state_dict()[k] for k in f32}
    a, b = (torch.cat([v.flatten() for v in x.values()]) for x in (step, ref_step))
    cos = float(a @ b / (a.norm() * b.norm()))
    assert float(b.abs().max()) > 1e-3 and cos > 0.9, cos   # same samples at step 1: bf16 rounding apart
    assert any(float((b16[k] - b16[k].bfloat16().float()).abs().max()) > 0 for k in b16)   # not bf16-rounded
