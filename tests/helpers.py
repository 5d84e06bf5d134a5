"""Shared by the trainer tests: tiny data, models, a toy reward and run helpers; a fixed GRPO batch on the tiny
model and the plain full-batch PyTorch GRPO objective (clip, k3 KL, token-mean, truncated IS weights) that
grpo_update must reproduce. Run as a script under torchrun it is the 2-rank driver of test_trainer_math (main)."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common
import train_rwml

OBJECTS = ["apple", "mug", "book", "key", "pen", "cd", "bowl", "vase"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny-model steps are many small ops: one thread is as fast, and a busy machine cannot stall it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_triples(path: Path, n: int = 8) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            o = OBJECTS[i % len(OBJECTS)]
            f.write(json.dumps({
                "id": f"t{i}", "env": "alfworld", "task_id": f"task{i}", "instruction": f"put a {o} in drawer 1",
                "history": [{"obs": "You arrive at the kitchen.", "action": "look"}],
                "state": f"You see a {o} on table 1.", "action": f"take {o} from table 1",
                "next_state": f"You pick up the {o} from the table 1.", "next_kind": "obs"}) + "\n")
    return path


def save_peaked_tiny(path: Path) -> str:
    """The tiny model with its (tied) embeddings scaled x30: a peaked next-token distribution, so sampled tokens
    repeat and temperature matters (the random-init tiny model is almost uniform over 49k tokens)."""
    lm, tok = common.load_model("tiny")
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(30.0)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# A reward the tiny model can learn in a few dozen steps: the share of response tokens from the lower half of
# the vocabulary. (The RWML reward needs a model that already writes <next_state> tags.)
HALF_VOCAB = 49152 // 2


def half_vocab_reward(samples, triples):
    return torch.tensor([sum(t < HALF_VOCAB for t in x.response_ids) / len(x.response_ids) for x in samples])


def toy_reward(monkeypatch, fn=half_vocab_reward):
    monkeypatch.setattr(train_rwml, "make_reward", lambda s: fn)


def weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


# a torchrun driver: train_rwml.main with the half-vocabulary toy reward (format with root=, half=)
DRIVER = """
import sys
sys.path.insert(0, {root!r})
import torch
import train_rwml

def half_vocab_reward(samples, triples):
    return torch.tensor([sum(t < {half} for t in x.response_ids) / len(x.response_ids) for x in samples])

train_rwml.make_reward = lambda s: half_vocab_reward
train_rwml.main(sys.argv[1:])
"""


def small(model, data, out, *extra) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out-dir", str(out), "--prompts-per-step", "4",
            "--group-size", "8", "--max-new-tokens", "8", "--micro-batch", "32", "--beta", "0", *map(str, extra)]


def metrics(out) -> list[dict]:
    return common.read_jsonl(Path(out) / "metrics.jsonl")


# ----------------------------------------------------------------------------------------------------------
# A fixed GRPO batch and the objective written out

N_SEQS = 6


def grpo_settings(tis_cap: float) -> train_rwml.Settings:
    """Two optimizer steps (ppo epochs) of plain SGD, no grad clipping: the parameters after grpo_update are
    theta0 - lr * (g1 + g2), so they show any error in the loss, its normaliser or its gradient."""
    return train_rwml.Settings(beta=0.05, kl="k3", entropy_coef=0.0, clip_low=0.2, clip_high=0.28, ppo_epochs=2,
                               micro_batch=2, agg="token-mean", tis_cap=tis_cap, grad_clip=0.0, temperature=1.0,
                               max_new_tokens=8, lr=1.0)


def make_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(policy, reference): the tiny model and a perturbed copy, so the KL term is not zero."""
    lm, _ = common.load_model("tiny", dtype=torch.float32, device="cpu")
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return lm, ref


def response_logprobs(lm, seq: dict) -> torch.Tensor:
    """log pi(response token | prefix) from a plain forward and a full log-softmax (no fused kernel)."""
    ids = torch.tensor(seq["prompt_ids"] + seq["response_ids"])
    logq = torch.log_softmax(lm(input_ids=ids[None]).logits[0, :-1].float(), -1)
    lp = logq.gather(1, ids[1:, None]).squeeze(1)
    return lp[len(seq["prompt_ids"]) - 1:]


def make_seqs(lm) -> list[dict]:
    """N_SEQS sequences of random ids; the sampler's log-probs are the policy's own plus noise (a sampler that
    disagrees with the trainer), so truncated IS weights differ from 1 and some hit the cap."""
    g = torch.Generator().manual_seed(2)
    seqs = []
    for i in range(N_SEQS):
        p = torch.randint(0, 49152, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(0, 49152, (2 + i % 5,), generator=g).tolist()
        seqs.append({"prompt_ids": p, "response_ids": r, "adv": float(torch.randn((), generator=g))})
    with torch.no_grad():
        for q in seqs:
            lp = response_logprobs(lm, q)
            q["logprobs"] = (lp + 1.2 * torch.randn(lp.shape, generator=g)).clamp(max=0.0).tolist()
    return seqs


def observation_nll(lm, seq: dict) -> torch.Tensor:
    """-log pi(prompt token | prefix) of the prompt tokens seq["obs_span"] marks, from a plain forward."""
    a, b = seq["obs_span"]
    ids = torch.tensor(seq["prompt_ids"])
    logq = torch.log_softmax(lm(input_ids=ids[None]).logits[0, :-1].float(), -1)
    return -logq.gather(1, ids[1:, None]).squeeze(1)[a - 1:b - 1]


def reference_update(lm, ref, seqs: list[dict], s: train_rwml.Settings, echo_nll: list | None = None,
                     dyna: tuple[list[dict], float] | None = None,
                     losses: list | None = None) -> dict[str, torch.Tensor]:
    """The GRPO objective written out on the whole batch: per token
        -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) * w  +  beta * (exp(ref - logp) - (ref - logp) - 1)
    with r = pi / pi_old, w = min(pi_old / pi_rollout, tis_cap) (1 without TIS), averaged over all response tokens
    of the batch, + echo_coef x the mean NLL of every sequence's observation tokens (ECHO; each epoch's value is
    appended to echo_nll); with dyna = (world-model seqs, weight), + weight x the same GRPO objective averaged over
    the world-model seqs' own tokens (each epoch's pair of GRPO losses is appended to losses); ppo_epochs steps of
    SGD. -> the parameters after them."""
    lm = copy.deepcopy(lm)
    params = [p for p in lm.parameters() if p.requires_grad]
    parts = [(seqs, 1.0)] + ([dyna] if dyna else [])
    with torch.no_grad():
        old = [[response_logprobs(lm, q) for q in part] for part, _ in parts]
        ref_lp = [[response_logprobs(ref, q) for q in part] for part, _ in parts]
    for _ in range(s.ppo_epochs):
        total, epoch_losses = 0.0, []
        for (part, weight), part_old, part_ref in zip(parts, old, ref_lp):
            loss = 0.0
            for q, o, rl in zip(part, part_old, part_ref):
                logp = response_logprobs(lm, q)
                ratio = torch.exp(logp - o)
                a = q["adv"]
                pg = -torch.minimum(ratio * a, ratio.clamp(1 - s.clip_low, 1 + s.clip_high) * a)
                if s.tis_cap > 0:
                    pg = pg * torch.exp(o - torch.tensor(q["logprobs"])).clamp(max=s.tis_cap)
                kl = torch.exp(rl - logp) - (rl - logp) - 1
                loss = loss + (pg + s.beta * kl).sum()
            loss = loss / sum(len(q["response_ids"]) for q in part)
            epoch_losses.append(float(loss.detach()))
            total = total + weight * loss
        if losses is not None:
            losses.append(epoch_losses)
        if s.echo_coef:
            nll = torch.cat([observation_nll(lm, q) for q in seqs]).mean()
            total = total + s.echo_coef * nll
            if echo_nll is not None:
                echo_nll.append(float(nll))
        grads = torch.autograd.grad(total, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(s.lr * g)
    return {n: p.detach().clone() for n, p in lm.named_parameters()}


def run_grpo_update(lm, ref, seqs: list[dict], s: train_rwml.Settings, d: common.Dist,
                    dyna: tuple[list[dict], float] | None = None) -> dict:
    """train_rwml.grpo_update with SGD on this rank's seqs (lm wrapped by common.wrap_for_training beforehand;
    dyna: Dyna's world-model seqs and their weight)."""
    policy_logprobs = lm if isinstance(lm, common.TokenLogprobs) else common.wrap_for_training(lm, d)
    params = [p for p in policy_logprobs.lm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return train_rwml.grpo_update(seqs, policy_logprobs, common.TokenLogprobs(ref), params, opt, sched, s, d, pad_id=0,
                                  dyna=dyna)


def main(out: str) -> None:
    """torchrun driver (2 ranks, gloo, FSDP2): (1) grpo_update on contiguous halves of the fixed batch, full
    parameters saved to out/params.pt; (2) a checkpoint with a weight missing must be refused at load."""
    torch.set_num_threads(1)
    d = common.init_distributed()
    out = Path(out)
    lm, ref = make_models()
    seqs = make_seqs(lm)
    s = grpo_settings(tis_cap=2.0)
    policy_logprobs = common.wrap_for_training(lm, d)
    half = len(seqs) // d.world
    stats = run_grpo_update(policy_logprobs, ref, seqs[d.rank * half:(d.rank + 1) * half], s, d)
    full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in lm.named_parameters()}
    if d.main:
        torch.save({"params": full, "stats": stats}, out / "params.pt")

    ckpt = common.save_checkpoint(out / "ckpt", 1, lm)
    if d.main:   # drop one decoder weight from the checkpoint
        from safetensors.torch import load_file, save_file
        w = load_file(ckpt / "model.safetensors")
        del w["model.layers.0.mlp.up_proj.weight"]
        save_file(w, ckpt / "model.safetensors")
    torch.distributed.barrier()
    try:
        common.load_checkpoint(out / "ckpt" / "step_000001", lm)
        verdict = "loaded"
    except RuntimeError as e:
        verdict = f"refused: {e}"
    if d.main:
        (out / "load_verdict.txt").write_text(verdict)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
