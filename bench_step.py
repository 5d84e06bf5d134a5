"""One GRPO step of train_rwml.py --task wm next to TRL's GRPOTrainer on the same model, batch and reward.

  python bench_step.py                                   # smollm2-135m, 8 prompts x G=4, 64 new tokens
  python bench_step.py --side rwml --steps 5             # one side only

Each side runs in its own subprocess (so its peak RSS is its own), takes one warm-up step, then `steps` timed
steps; the table shows mean step time and its split (generate / score / train), and peak RSS. Same settings on
both sides: temperature 1.0, lr 1e-6, beta 0.001 (a reference model), clip 0.2, token-mean loss ("dapo" in TRL),
one optimizer step per 32 completions in micro-batches of `micro_batch`, the RWML reward (MiniLM embedding cosine).
A benchmark: it prints, it asserts nothing. TRL is optional (pip install trl); without it the TRL row says so.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

TRIPLES = [  # ALFWorld-like transitions (the shape of collect.py's triples.jsonl): instruction, state, action, next
    ("put a clean mug in coffeemachine",
     ("You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
      "a sinkbasin 1, and a coffeemachine 1."),
     "go to countertop 1",
     "You arrive at countertop 1. On the countertop 1, you see a mug 1, a knife 2, and a apple 3."),
    ("heat some egg and put it in garbagecan", "You arrive at fridge 1. The fridge 1 is closed.", "open fridge 1",
     "You open the fridge 1. The fridge 1 is open. In it, you see a egg 2, a lettuce 1, and a tomato 3."),
    ("put two cellphone in bed", "You arrive at desk 1. On the desk 1, you see a cellphone 2, a pen 1.",
     "take cellphone 2 from desk 1", "You pick up the cellphone 2 from the desk 1."),
    ("look at bowl under the desklamp", "You arrive at shelf 2. On the shelf 2, you see a bowl 1.",
     "take bowl 1 from shelf 2", "You pick up the bowl 1 from the shelf 2."),
    ("clean some plate and put it in cabinet", "You are carrying a plate 1. You arrive at sinkbasin 1.",
     "clean plate 1 with sinkbasin 1", "You clean the plate 1 using the sinkbasin 1."),
    ("put a keychain in safe", "You arrive at dresser 1. On the dresser 1, you see a keychain 3, a vase 2.",
     "take keychain 3 from dresser 1", "You pick up the keychain 3 from the dresser 1."),
    ("cool some apple and put it in microwave",
     "You are carrying a apple 1. You arrive at fridge 1. The fridge 1 is closed.",
     "cool apple 1 with fridge 1", "You cool the apple 1 using the fridge 1."),
    ("find two pillow and put them in armchair",
     "You arrive at sofa 1. On the sofa 1, you see a pillow 1, a pillow 2, and a remotecontrol 1.",
     "take pillow 1 from sofa 1", "You pick up the pillow 1 from the sofa 1."),
]


@dataclass
class Settings:
    """Step time and peak memory: train_rwml.py vs TRL's GRPOTrainer."""
    model: str = field(default="smollm2-135m", metadata={"help": "model both sides train"})
    prompts: int = field(default=8, metadata={"help": "prompts per step"})
    group_size: int = field(default=4, metadata={"help": "G completions per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion length cap"})
    micro_batch: int = field(default=8, metadata={"help": "sequences per forward/backward"})
    steps: int = field(default=2, metadata={"help": "timed steps (after one warm-up step)"})
    side: str = field(default="both", metadata={"choices": ["both", "rwml", "trl"], "help": "which side(s) to run"})
    out_dir: str = field(default="runs/bench_step", metadata={"help": "work dir (data, both runs)"})


def write_triples(path: Path) -> Path:
    rows = [{"id": f"b{i}", "env": "alfworld", "task_id": f"bench{i}", "instruction": ins, "history": [],
             "state": state, "action": action, "next_state": nxt, "next_kind": "obs"}
            for i, (ins, state, action, nxt) in enumerate(TRIPLES)]
    common.write_jsonl(path, rows)
    return path


def alfworld_triples(n: int, data_dir: str | None = None, split: str = "train", steps: int = 3,
                     history: int = 2) -> list[dict]:
    """Real world-model triples: the first n games of the official ALFWorld `split` played along their gold
    actions for `steps` steps; each game's last triple (it carries `history` turns of history, as collect.py's)."""
    import rollout

    def gold(messages_list, infos):
        return [common.Sample([], [], f"<think></think><action>{i['gold']}</action>", [], True) for i in infos]
    suite = rollout.make_suite("alfworld", split, data_dir=data_dir)
    episodes = rollout.run_episodes(gold, suite, [(t, 0) for t in suite.task_ids[:n]], env="alfworld", split=split,
                                    max_steps=steps, history=history, batch_size=n)
    return [rollout.episode_triples(ep, history)[-1] for ep in episodes]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_rwml(s: Settings, data: Path) -> dict:
    import train_rwml
    out = Path(s.out_dir) / "rwml"
    train_rwml.main(["--model", s.model, "--data", str(data), "--out-dir", str(out), "--prompts-per-step",
                     str(s.prompts), "--group-size", str(s.group_size), "--max-new-tokens", str(s.max_new_tokens),
                     "--micro-batch", str(s.micro_batch), "--gen-chunk", str(s.prompts), "--max-steps",
                     str(s.steps + 1), "--save-every", str(10**9), "--lr", "1e-6", "--beta", "0.001"])
    rows = common.read_jsonl(out / "metrics.jsonl")[-s.steps:]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)
    return {"step": mean("time_step"), "generate": mean("time_generate"), "score": mean("time_score"),
            "train": mean("time_train"), "diag": mean("time_diag"), "resp_len": mean("resp_len"),
            "agree_max": max(r["agree_max"] for r in rows)}


def run_trl(s: Settings, data: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import prompts
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
                      epsilon=0.2, loss_type="dapo", max_steps=s.steps + 1, logging_steps=1, report_to=[],
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


def child(s: Settings, side: str, data: Path) -> dict:
    """Run one side in a fresh process; -> its result row (or {"error": ...})."""
    cmd = [sys.executable, __file__, "--side", side, "--model", s.model, "--prompts", str(s.prompts),
           "--group-size", str(s.group_size), "--max-new-tokens", str(s.max_new_tokens), "--micro-batch",
           str(s.micro_batch), "--steps", str(s.steps), "--out-dir", s.out_dir]
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
    data = write_triples(out / "triples.jsonl")
    if os.environ.get("BENCH_CHILD"):   # one side, in this process
        try:
            row = run_rwml(s, data) if s.side == "rwml" else run_trl(s, data)
        except ImportError as e:
            row = {"error": f"TRL not usable here: {e}"}
        print("RESULT " + json.dumps({**row, "peak_rss_mib": peak_rss_mib()}), flush=True)
        return
    sides = ["rwml", "trl"] if s.side == "both" else [s.side]
    results = {side: child(s, side, data) for side in sides}
    print(f"\n{s.model}, {s.prompts} prompts x G={s.group_size}, max_new_tokens {s.max_new_tokens}, "
          f"micro-batch {s.micro_batch}, mean of {s.steps} steps after 1 warm-up, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'side':6} {'step s':>8} {'generate':>9} {'score':>7} {'train':>7} {'peak RSS MiB':>13}")
    for side, r in results.items():
        if "error" in r:
            print(f"{side:6} {r['error']}")
            continue
        print(f"{side:6} {r['step']:8.2f} {r['generate']:9.2f} {r['score']:7.2f} {r['train']:7.2f} "
              f"{r['peak_rss_mib']:13.0f}")
    if all("step" in r for r in results.values()) and len(results) == 2:
        print(f"TRL / rwml step time: {results['trl']['step'] / results['rwml']['step']:.2f}x; "
              f"peak RSS {results['trl']['peak_rss_mib'] / results['rwml']['peak_rss_mib']:.2f}x")
    if "rwml" in results and "step" in results["rwml"]:
        r = results["rwml"]
        print(f"rwml: mean response {r['resp_len']:.0f} tokens, diagnostics {1e3 * r['diag']:.1f} ms/step, "
              f"max |logp_rollout - logp_train| {r['agree_max']:.2e}")


if __name__ == "__main__":
    main()
