"""Agent rollouts -> episodes.jsonl -> world-model triples (RWML paper §2.2).

The target model plays the env itself: `rollouts` episodes per task at temperature 1.0, up to `max_steps` steps;
every step with a valid action becomes a triple <last `history` turns, state, action, next state>. Triples are split
90/10 at random, seeded (the paper; --val-split tasks: by task, so validation tasks are unseen); the validation part
trains filter.py's filter model.

  python collect.py --env alfworld --split train --model smollm2-135m --out-dir runs/collect
  torchrun --nproc_per_node 8 collect.py ...      # each rank plays a disjoint shard of (task, rollout) pairs

Outputs in out_dir: episodes.jsonl, triples.jsonl, triples_train.jsonl, triples_val.jsonl, stats.json,
metrics.jsonl (one row per finished episode), config.json. Resumable: each finished episode is appended and
fsynced at once (a rank writes episodes.rank{r}.jsonl under torchrun); a rerun of the same command merges what is
there, skips finished (task, rollout) pairs and plays the rest. Episodes whose env crashed are played again.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (MetricsLogger, Sample, append_jsonl, check_resume, init_distributed, load_model, parse_settings,
                    pick_tasks, print0, read_jsonl, read_jsonl_resumable, save_config, seed_everything, write_jsonl)
from rollout import episode_triples, make_suite, model_actor, run_episodes, strip_samples


@dataclass
class Settings:
    """Collect agent rollouts and turn them into world-model triples (RWML §2.2)."""
    env: str = field(default="alfworld", metadata={"choices": ["alfworld", "twx", "tau2"]})
    split: str = field(default="train", metadata={"help": "env split (alfworld: train | valid_seen | valid_unseen)"})
    model: str = field(default="smollm2-135m", metadata={"help": "tiny | smollm2-135m | HF id | checkpoint dir"})
    rollouts: int = field(default=3, metadata={"help": "episodes per task (paper: 3)"})
    max_steps: int = field(default=30, metadata={"help": "steps per episode (paper: 30)"})
    history: int = field(default=2, metadata={"help": "past turns in each triple and the text-game agent prompt "
                                                      "(paper: 2 ALFWorld, 5 τ²: pass --history 5 with --env tau2; "
                                                      "a τ² agent sees the whole conversation)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (paper: 1.0)"})
    top_p: float = 1.0
    max_new_tokens: int = field(default=512, metadata={"help": "response length cap per step (paper: 512)"})
    n_tasks: int | None = field(default=None, metadata={"help": "a seeded sample of this many tasks (none = all)"})
    task_type: str | None = field(default=None, metadata={"help": "only tasks of this type (alfworld: e.g. "
                                                                  "pick_and_place_simple; twx: a game, e.g. coin; "
                                                                  "tau2: a domain, airline | retail | telecom)"})
    user_model: str = field(default="smollm2-135m", metadata={"help": "τ² user simulator: a local model (tiny | "
                                                                      "smollm2-135m | HF id | path) or "
                                                                      "litellm:<name>, e.g. litellm:gpt-4.1; a "
                                                                      "comma list splits the rollouts into blocks "
                                                                      "(paper: 3 + 3 with two simulators)"})
    seed: int = 0
    out_dir: str = "runs/collect"
    batch_size: int = field(default=16, metadata={"help": "episodes played at once (one generate call per step)"})
    n_workers: int = field(default=0, metadata={"help": "env worker processes (0 = envs in this process)"})
    val_frac: float = field(default=0.1, metadata={"help": "fraction of the triples (or tasks) in triples_val"})
    val_split: str = field(default="triples", metadata={"choices": ["triples", "tasks"], "help": "triples: a seeded "
                                                        "random 90/10 of the triples (paper); tasks: whole tasks on "
                                                        "each side"})
    explore: float = field(default=0.0, metadata={"help": "probability that a step takes a random admissible "
                                                          "action instead of the model's (0 = paper; a model too "
                                                          "small to follow the format yields no triples without it)"})


# settings that change what an episode is: a rerun into the same out_dir must keep them
SAME_ON_RESUME = ("env", "split", "model", "max_steps", "history", "temperature", "top_p", "max_new_tokens",
                  "task_type", "seed", "explore", "user_model")


def check_settings(s: Settings) -> None:
    bounds = {"rollouts": 1, "max_steps": 1, "history": 0, "max_new_tokens": 1, "batch_size": 1, "n_workers": 0}
    bad = [f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(s, k)}" for k, lo in bounds.items()
           if getattr(s, k) < lo]
    if s.n_tasks is not None and s.n_tasks < 1:
        bad.append(f"--n-tasks must be >= 1 (or none for all), got {s.n_tasks}")
    if len(s.user_model.split(",")) > s.rollouts:
        bad.append(f"--user-model names {len(s.user_model.split(','))} simulators for --rollouts {s.rollouts}")
    if not 0 <= s.val_frac < 1:
        bad.append(f"--val-frac must be in [0, 1), got {s.val_frac}")
    if bad:
        raise SystemExit("; ".join(bad))


def user_model_of(s: Settings, rollout: int) -> str:
    """The user simulator of rollout r: with k comma-separated models, rollouts are split into k contiguous blocks
    (6 rollouts, "a,b": 0-2 play with a, 3-5 with b), so ids (task#rollout#t) never collide across simulators."""
    models = s.user_model.split(",")
    return models[rollout * len(models) // s.rollouts]


def merge_episodes(out: Path) -> list[dict]:
    """episodes.jsonl + any episodes.rank*.jsonl -> one episodes.jsonl, one row per (task, rollout), sorted.
    A later row wins: an episode retried after an env crash replaces its failed row."""
    rank_files = sorted(out.glob("episodes.rank*.jsonl"))
    rows = {}
    for path in [out / "episodes.jsonl", *rank_files]:
        for e in read_jsonl_resumable(path):
            rows[(e["task_id"], e["rollout"])] = e
    episodes = [rows[k] for k in sorted(rows)]
    write_jsonl(out / "episodes.jsonl", episodes)
    for path in rank_files:
        path.unlink()
    return episodes


def split_triples(triples: list[dict], val_frac: float, seed: int,
                  by: str = "triples") -> tuple[list[dict], list[dict]]:
    """-> (train, val), each in the input order. by "triples": a seeded random val_frac of the triples (paper §2.2:
    21,011 / 2,288); by "tasks": a seeded random val_frac of the tasks, all triples of a task on the same side."""
    units = [t["id"] for t in triples] if by == "triples" else sorted({t["task_id"] for t in triples})
    random.Random(seed).shuffle(units)
    n_val = max(1, round(val_frac * len(units))) if val_frac > 0 and len(units) > 1 else 0
    val = set(units[:n_val])
    key = "id" if by == "triples" else "task_id"
    return [t for t in triples if t[key] not in val], [t for t in triples if t[key] in val]


def episode_stats(episodes: list[dict]) -> dict:
    n = len(episodes)
    steps = sum(e["n_steps"] for e in episodes)
    invalid = sum(not st["valid"] for e in episodes for st in e["steps"])
    return {"episodes": n, "success_rate": sum(e["success"] for e in episodes) / n if n else None,
            "mean_steps": steps / n if n else None, "env_steps": steps,
            "invalid_action_rate": invalid / steps if steps else None,
            "errors": sum("error" in e for e in episodes)}


def write_outputs(s: Settings, out: Path, episodes: list[dict], run: dict) -> dict:
    triples = [t for e in episodes for t in episode_triples(e, s.history)]
    train, val = split_triples(triples, s.val_frac, s.seed, s.val_split)
    write_jsonl(out / "triples.jsonl", triples)
    write_jsonl(out / "triples_train.jsonl", train)
    write_jsonl(out / "triples_val.jsonl", val)
    stats = {**episode_stats(episodes), "triples_kept": len(triples),
             "triples_dropped": sum(e["n_steps"] for e in episodes) - len(triples),
             "triples_train": len(train), "triples_val": len(val), "this_run": run}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def explore_actor(act, p: float, rng: random.Random):
    """Epsilon-greedy data collection: with probability p a step takes a random admissible action instead of the
    model's reply. The transition stays real (the env answers it); only who chose the action changes (marked in
    the reply). The model generates only for the steps that do not explore, so p = 1 needs no model at all."""
    def explore(messages_list, infos):
        pick = [rng.choice(info["admissible"]) if info.get("admissible") and rng.random() < p else None
                for info in infos]
        asked = [i for i, a in enumerate(pick) if a is None]
        replies = iter(act([messages_list[i] for i in asked], [infos[i] for i in asked]) if asked else [])
        return [next(replies) if a is None else Sample([], [], f"<think>explore</think><action>{a}</action>", [], True)
                for a in pick]
    return explore


def main(s: Settings, act=None) -> dict | None:
    """act: a replacement for the model (tests play a scripted expert with it); None = sample from s.model."""
    check_settings(s)
    d = init_distributed()
    out = Path(s.out_dir)
    check_resume(s, out, SAME_ON_RESUME)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        merge_episodes(out)  # folds in what a killed run left (and drops a torn last line)
        save_config(s, out)
    if dist.is_initialized():
        dist.barrier()
    seed_everything(s.seed + d.rank)
    suites = {m: make_suite(s.env, s.split, task_type=s.task_type, user_model=m, device=d.device,
                            n_workers=s.n_workers) for m in dict.fromkeys(s.user_model.split(","))}
    suite = next(iter(suites.values()))  # every suite holds the same tasks
    jobs = [(task_id, r) for task_id in pick_tasks(suite.task_ids, s.n_tasks, s.seed) for r in range(s.rollouts)]
    finished = {(e["task_id"], e["rollout"]) for e in read_jsonl(out / "episodes.jsonl") if "error" not in e}
    all_todo = [job for job in jobs if job not in finished]
    todo = all_todo[d.rank::d.world]  # disjoint shards
    print0(f"collect {s.model} on {s.env}/{s.split}: {len(jobs)} episodes, {len(jobs) - len(all_todo)} already "
           f"done, {len(all_todo)} to play on {d.world} rank(s)")

    if act is None and s.explore >= 1 and s.env != "tau2":  # text games list admissible actions: all explore
        def act(messages_list, infos):
            raise RuntimeError("--explore 1 asked the model for a step without admissible actions")
    if act is None:
        model, tok = load_model(s.model, device=d.device)
        generator = torch.Generator(device=d.device).manual_seed(s.seed + d.rank)
        act = model_actor(model, tok, s.temperature, s.max_new_tokens, s.top_p, generator=generator)
    if s.explore > 0:
        act = explore_actor(act, s.explore, random.Random(s.seed + d.rank))
    gen_s = 0.0

    def timed_act(messages_list, infos):
        nonlocal gen_s
        t = time.perf_counter()
        samples = act(messages_list, infos)
        gen_s += time.perf_counter() - t
        return samples

    part = out / ("episodes.jsonl" if d.world == 1 else f"episodes.rank{d.rank}.jsonl")
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=d.main)
    bar = tqdm(total=len(todo), desc=f"collect rank {d.rank}", disable=not d.main, dynamic_ncols=True)
    counts = {"episodes": 0, "wins": 0, "steps": 0, "invalid": 0}
    start = time.perf_counter()

    def save(episode: dict) -> None:  # one fsynced line per finished episode: a kill loses only the live ones
        episode = strip_samples(episode)
        if s.env == "tau2":
            episode["user_model"] = user_model_of(s, episode["rollout"])
        append_jsonl(part, [episode])
        invalid = sum(not st["valid"] for st in episode["steps"])
        for k, v in (("episodes", 1), ("wins", episode["success"]), ("steps", episode["n_steps"]),
                     ("invalid", invalid)):
            counts[k] += v
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(success=f"{counts['wins'] / counts['episodes']:.2f}",
                        steps_per_s=f"{counts['steps'] / elapsed:.2f}")
        metrics.log({"episode": counts["episodes"], "task_id": episode["task_id"], "rollout": episode["rollout"],
                     "success": episode["success"], "n_steps": episode["n_steps"], "invalid_steps": invalid,
                     "error": episode.get("error"), "success_so_far": counts["wins"] / counts["episodes"]})

    try:
        for user_model, user_suite in suites.items():
            run_episodes(timed_act, user_suite, [job for job in todo if user_model_of(s, job[1]) == user_model],
                         env=s.env, split=s.split, model=s.model, max_steps=s.max_steps, history=s.history,
                         n_workers=s.n_workers, batch_size=s.batch_size, on_done=save)
    except KeyboardInterrupt:
        print0(f"\ninterrupted: {counts['episodes']} finished episodes are saved in {part}; rerun to resume")
        raise
    finally:
        bar.close()
    if dist.is_initialized():
        dist.barrier()
    if not d.main:
        return None
    wall = time.perf_counter() - start
    episodes = merge_episodes(out)
    played = set(all_todo)
    new = [e for e in episodes if (e["task_id"], e["rollout"]) in played]
    new_steps = sum(e["n_steps"] for e in new)
    run = {"episodes": len(new), "env_steps": new_steps, "wall_s": round(wall, 2),
           "generate_s_rank0": round(gen_s, 2), "world": d.world,
           "episodes_per_hour": round(len(new) / wall * 3600, 1) if new else None,
           "env_steps_per_s": round(new_steps / wall, 3) if new else None}
    stats = write_outputs(s, out, episodes, run)
    metrics.log({"summary": stats})
    print0(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main(parse_settings(Settings))
