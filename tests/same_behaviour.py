"""A fixed-seed behaviour pin for refactors of train_rwml.py: run a few short training runs, then compare two such
recordings (metrics.jsonl rows without their timings, and every tensor of each final checkpoint, bitwise).

  python tests/same_behaviour.py run OUT_BEFORE          # on the code before the change
  python tests/same_behaviour.py run OUT_AFTER           # on the code after it
  python tests/same_behaviour.py compare OUT_BEFORE OUT_AFTER

Cases: SmolLM2-135M in bf16 on real ALFWorld world-model triples with the RWML reward (3 steps of 2 prompts x G 4,
32 new tokens, KL, entropy bonus and TIS live), SmolLM2-135M playing TextWorld-Express coin (1 step of 1 task x G 2,
3 env steps), and tiny-model runs with a learnable toy reward that cover every loss aggregation, KL estimator, the
clip (2 ppo epochs), LoRA, dropped zero-variance groups and unshared prompts. `run --only tiny` runs the tiny cases
alone (a minute; SmolLM2's take ~10 on two cores). One thread: CPU reductions then sum in one fixed order.
Not a pytest module (it trains for minutes); `compare` exits 1 when anything differs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TIMING = ("time", "tokens_per_s")   # and every time_* key: wall clock, never the same twice

SMOLLM2 = {
    "wm_smollm2": ["--task", "wm", "--model", "smollm2-135m", "--precision", "bf16", "--max-steps", "3",
                   "--prompts-per-step", "2", "--group-size", "4", "--gen-chunk", "2", "--max-new-tokens", "32",
                   "--beta", "0.001", "--entropy-coef", "0.001", "--tis-cap", "2", "--val-size", "4",
                   "--val-every", "3", "--micro-batch", "8", "--save-every", "100"],
    "policy_smollm2": ["--task", "policy", "--env", "twx", "--task-type", "coin", "--model", "smollm2-135m",
                       "--precision", "bf16", "--max-steps", "1", "--prompts-per-step", "1", "--group-size", "2",
                       "--max-env-steps", "3", "--max-new-tokens", "32", "--beta", "0.01", "--entropy-coef", "0.001",
                       "--save-every", "100"],
}
TINY_WM = ["--task", "wm", "--model", "tiny", "--max-steps", "3", "--prompts-per-step", "4", "--group-size", "4",
           "--max-new-tokens", "8", "--lr", "1e-2", "--save-every", "100"]
TINY = {
    "tiny_token_mean_k3_clip_tis": [*TINY_WM, "--beta", "0.1", "--kl", "k3", "--ppo-epochs", "2", "--tis-cap", "2",
                                    "--clip-high", "0.28", "--micro-batch", "5", "--entropy-coef", "0"],
    "tiny_seq_mean_k2_entropy_plain_bf16": [*TINY_WM, "--agg", "seq-mean-token-mean", "--beta", "0.05", "--kl", "k2",
                                            "--entropy-coef", "0.01", "--no-share-prompt", "--precision", "bf16",
                                            "--micro-batch", "6"],
    "tiny_sum_norm_k1_lora_drop": [*TINY_WM, "--agg", "seq-mean-token-sum-norm", "--beta", "0.05", "--kl", "k1",
                                   "--drop-zero-var", "--adv-scale", "none", "--lora-rank", "4", "--entropy-coef",
                                   "0.001", "--ppo-epochs", "2"],
    "tiny_policy_twx": ["--task", "policy", "--env", "twx", "--model", "tiny", "--max-steps", "2",
                        "--prompts-per-step", "2", "--group-size", "2", "--max-env-steps", "3", "--max-new-tokens",
                        "8", "--lr", "1e-3", "--beta", "0.01", "--entropy-coef", "0.001", "--step-penalty", "0.5",
                        "--save-every", "100"],
}


def real_triples(path: Path) -> Path:
    """4 real world-model triples: the first ALFWorld train games ($ALFWORLD_DATA) played along their gold
    actions, each game's third-step triple (history 2)."""
    import bench_step
    import common
    if not path.exists():
        common.write_jsonl(path, bench_step.alfworld_triples(4))
    return path


def run(out: Path, only: str) -> None:
    import helpers
    import train_rwml
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    triples = real_triples(out / "triples.jsonl")
    real_reward = train_rwml.make_reward
    cases = {**(SMOLLM2 if only != "tiny" else {}), **TINY}
    for name, args in cases.items():
        toy = name.startswith("tiny")
        train_rwml.make_reward = (lambda s: helpers.half_vocab_reward) if toy else real_reward
        data = ["--data", str(triples)] + (["--val-data", str(triples)] if name == "wm_smollm2" else [])
        print(f"== {name}", flush=True)
        wm = args[args.index("--task") + 1] == "wm"
        train_rwml.main([*args, *(data if wm else []), "--out-dir", str(out / name)])


def rows(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if k not in TIMING and not k.startswith("time_")})
    return out


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the final checkpoint: model weights, LoRA adapters, optimizer state."""
    ckpt = run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip()
    out = {f"model/{k}": v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    for i, per_param in state["optimizer"]["state"].items():
        out.update((f"optim/{i}/{k}", v) for k, v in per_param.items() if torch.is_tensor(v))
    return out


def compare(a: Path, b: Path) -> bool:
    same = True
    for case in sorted(p.name for p in a.iterdir() if (p / "metrics.jsonl").exists()):
        if not (b / case / "metrics.jsonl").exists():
            print(f"{case}: missing in {b}")
            same = False
            continue
        ra, rb = rows(a / case), rows(b / case)
        bad_rows = [(i + 1, k, x.get(k), y.get(k)) for i, (x, y) in enumerate(zip(ra, rb))
                    for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        ta, tb = tensors(a / case), tensors(b / case)
        bad = [k for k in ta if k not in tb or not torch.equal(ta[k], tb[k])] + [k for k in tb if k not in ta]
        drift = max((float((ta[k].double() - tb[k].double()).abs().max() / ta[k].double().abs().max().clamp(min=1e-30))
                     for k in bad if k in ta and k in tb and k.startswith("model/")), default=0.0)
        ok = len(ra) == len(rb) and not bad_rows and not bad
        same &= ok
        print(f"{case}: {'identical' if ok else 'DIFFERENT'} ({len(ra)} rows, {len(ta)} tensors"
              + ("" if ok else f"; {len(bad_rows)} row values differ, {len(bad)} tensors differ, "
                                f"max relative weight change {drift:.2e}") + ")")
        for step, k, x, y in bad_rows[:12]:
            print(f"    step {step} {k}: {x!r} -> {y!r}")
    return same


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]), sys.argv[4] if sys.argv[3:4] == ["--only"] else "")
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(0 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 1)
    else:
        sys.exit(__doc__)
