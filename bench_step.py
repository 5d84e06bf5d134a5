"""One GRPO step of train_rwml.py --task wm, prompt shared and not, next to TRL's GRPOTrainer, on the same model,
batch and reward.

  python bench_step.py                                   # smollm2-135m, 8 real prompts x G=8 and G=4, TRL at G=8
  python bench_step.py --sides shared,plain --group-sizes 8 --steps 3

Each (side, G) runs in its own subprocess (so its peak RSS is its own), takes `warmup` untimed steps, then `steps`
timed steps; the table shows mean step time, its generate and train parts, the train part relative to the plain
path's at the same G, peak RSS, and the tokens the trainer's forward passes computed (padding included) with the
padding share. shared = --share-prompt (each prompt once per group, common.pack_shared), plain = --no-share-prompt.
Same settings on every side: temperature 1.0, lr 1e-6, beta 0.001 (a reference model), clip 0.2, token-mean loss
("dapo" in TRL), one optimizer step per step in micro-batches of `micro_batch`, the RWML reward (MiniLM embedding
cosine). The prompts are real world-model triples: official ALFWorld train games played along their gold actions
(history 2, as collect.py writes them). A benchmark: it prints, it asserts nothing. TRL is optional (pip install
trl); without it the TRL row says so.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common
import prompts


@dataclass
class Settings:
    """Step time and peak memory: train_rwml.py with and without --share-prompt vs TRL's GRPOTrainer."""
    model: str = common.flag("smollm2-135m", "model every side trains")
    prompts: int = common.flag(8, "prompts per step (real ALFWorld world-model triples)")
    group_sizes: str = common.flag("8,4", "G completions per prompt, comma-separated")
    trl_group_size: int = common.flag(8, "the G at which TRL runs (once)")
    max_new_tokens: int = common.flag(64, "completion length cap")
    micro_batch: int = common.flag(8, "sequences per forward/backward")
    warmup: int = common.flag(1, "untimed steps first")
    steps: int = common.flag(2, "timed steps")
    sides: str = common.flag("shared,plain,trl", "comma-separated: shared, plain, trl")
    data_dir: str = common.flag("", "ALFWorld data dir ('' = $ALFWORLD_DATA)")
    side: str = common.flag("", "internal: the one side a child process runs")
    group_size: int = common.flag(0, "internal: the child's G")
    out_dir: str = common.flag("runs/bench_step", "work dir (data, every run)")


def alfworld_triples(n: int, data_dir: str | None = None, split: str = "train", steps: int = 3,
                     history: int = 2) -> list[dict]:
    """Real world-model triples: the first n games of the official ALFWorld `split` played along their gold
    actions for `steps` steps; each game's last triple (it carries `history` turns of history, as collect.py's)."""
    import rollout

    def gold(messages_list, infos):
        return [common.Sample([], [], f"<think></think><action>{i['gold']}</action>", [], True) for i in infos]
    suite = rollout.make_suite("alfworld", split, data_dir=data_dir)
    episodes = rollout.run_episodes(gold, suite, [(t, 0) for t in suite.task_ids[:n]], env="alfworld", split=split,
                                    max_env_steps=steps, history=history, batch_size=n)
    return [rollout.episode_triples(ep, history)[-1] for ep in episodes]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_rwml(s: Settings, data: Path) -> dict:
    import train_rwml
    out = Path(s.out_dir) / f"{s.side}_g{s.group_size}"
    shutil.rmtree(out, ignore_errors=True)   # a fresh run: no metrics or checkpoints of an earlier one
    train_rwml.main(["--model", s.model, "--data", str(data), "--out-dir", str(out), "--prompts-per-step",
                     str(s.prompts), "--group-size", str(s.group_size), "--max-new-tokens", str(s.max_new_tokens),
                     "--micro-batch", str(s.micro_batch), "--gen-chunk", str(s.prompts), "--max-steps",
                     str(s.warmup + s.steps), "--save-every", str(10**9), "--lr", "1e-6", "--beta", "0.001",
                     "--share-prompt" if s.side == "shared" else "--no-share-prompt"])
    rows = common.read_jsonl(out / "metrics.jsonl")[-s.steps:]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)
    return {"step": mean("time_step"), "generate": mean("time_generate"), "score": mean("time_score"),
            "train": mean("time_train"), "diag": mean("time_diag"), "resp_len": mean("resp_len"),
            "agree_max": max(r["agree_max"] for r in rows), "computed": mean("train_tokens_computed"),
            "pad_frac": mean("pad_frac")}


def run_trl(s: Settings, data: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import WorldModelReward

    triples = common.read_jsonl(data)
    ds = Dataset.from_list([{"prompt": prompts.wm_messages(t), "next_state": t["next_state"],
                             "next_kind": t["next_kind"]} for t in triples])
    wm = WorldModelReward("minilm")
    timers = {"generate": 0.0, "score": 0.0}

    def rwml_reward(prompts, completions, next_state, next_kind, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return wm(texts, [{"next_state": n, "next_kind": k} for n, k in zip(next_state, next_kind)]).tolist()

    # TRL loads its reference model from the model's path: hand it a saved copy (tiny has no path of its own)
    model, tok = common.load_model(s.model)
    model_dir = Path(s.out_dir) / "trl_model"
    model.save_pretrained(model_dir)
    tok.padding_side = "left"
    tok.save_pretrained(model_dir)
    accum = s.prompts * s.group_size // s.micro_batch
    args = GRPOConfig(output_dir=str(Path(s.out_dir) / "trl"), per_device_train_batch_size=s.micro_batch,
                      gradient_accumulation_steps=accum, num_generations=s.group_size,
                      max_completion_length=s.max_new_tokens, temperature=1.0, learning_rate=1e-6, beta=0.001,
                      epsilon=0.2, loss_type="dapo", max_steps=s.warmup + s.steps, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                      lr_scheduler_type="constant", model_init_kwargs={"dtype": "float32"})
    step_times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t = time.perf_counter()
            timers.update(generate=0.0, score=0.0)

        def on_step_end(self, *a, **kw):
            step_times.append((time.perf_counter() - self.t, dict(timers)))

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=rwml_reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    for name, key in (("_generate", "generate"), ("_calculate_rewards", "score")):
        fn = getattr(trainer, name)

        def timed(*a, _fn=fn, _key=key, **kw):
            t = time.perf_counter()
            out = _fn(*a, **kw)
            timers[_key] += time.perf_counter() - t
            return out
        setattr(trainer, name, timed)
    trainer.train()
    rows = step_times[-s.steps:]
    step = sum(t for t, _ in rows) / len(rows)
    gen = sum(p["generate"] for _, p in rows) / len(rows)
    score = sum(p["score"] for _, p in rows) / len(rows)
    # train = the rest of TRL's step: reference log-probs, loss, backward, optimizer (as in rwml's time_train)
    return {"step": step, "generate": gen, "score": score, "train": step - gen - score}


def child(s: Settings, side: str, group_size: int, data: Path) -> dict:
    """Run one (side, G) in a fresh process; -> its result row (or {"error": ...})."""
    cmd = [sys.executable, __file__, "--side", side, "--group-size", str(group_size), "--model", s.model,
           "--prompts", str(s.prompts), "--max-new-tokens", str(s.max_new_tokens), "--micro-batch",
           str(s.micro_batch), "--warmup", str(s.warmup), "--steps", str(s.steps), "--out-dir", s.out_dir]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **os.environ, "BENCH_CHILD": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main(argv=None) -> None:
    s = common.parse_settings(Settings, argv)
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "triples.jsonl"
    if os.environ.get("BENCH_CHILD"):   # one side, in this process
        try:
            row = run_trl(s, data) if s.side == "trl" else run_rwml(s, data)
        except ImportError as e:
            row = {"error": f"TRL not usable here: {e}"}
        print("RESULT " + json.dumps({**row, "peak_rss_mib": peak_rss_mib()}), flush=True)
        return
    common.write_jsonl(data, alfworld_triples(s.prompts, s.data_dir or None))
    tok = common.load_tokenizer(s.model)
    lens = [len(common.chat_ids(tok, prompts.wm_messages(t))) for t in common.read_jsonl(data)]
    sides = s.sides.split(",")
    runs = [(side, g) for g in map(int, s.group_sizes.split(",")) for side in sides
            if side != "trl" or g == s.trl_group_size]
    results = {run: child(s, *run, data) for run in runs}
    print(f"\n{s.model}, {s.prompts} real ALFWorld WM prompts ({min(lens)}-{max(lens)} tokens, mean "
          f"{sum(lens) / len(lens):.0f}), max_new_tokens {s.max_new_tokens}, micro-batch {s.micro_batch}, mean of "
          f"{s.steps} steps after {s.warmup} warm-up, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| side | G | step s | generate s | train s | train / plain | peak RSS MiB | tokens computed | padding |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (side, g), r in results.items():
        if "error" in r:
            print(f"| {side} | {g} | {r['error']} |")
            continue
        plain = results.get(("plain", g), {})
        ratio = f"{r['train'] / plain['train']:.2f}x" if "train" in plain else "-"
        tokens = f"{r['computed']:.0f} | {100 * r['pad_frac']:.1f}%" if "computed" in r else "- | -"
        print(f"| {side} | {g} | {r['step']:.1f} | {r['generate']:.1f} | {r['train']:.1f} | {ratio} | "
              f"{r['peak_rss_mib']:.0f} | {tokens} |")
    for (side, g), r in results.items():
        if "resp_len" in r:
            print(f"{side} G={g}: mean response {r['resp_len']:.0f} tokens, diagnostics {1e3 * r['diag']:.1f} ms/step, "
                  f"max |logp_rollout - logp_train| {r['agree_max']:.2e}")


if __name__ == "__main__":
    main()
