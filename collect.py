"""Agent rollouts -> episodes.jsonl -> world-model triples (RWML paper §2.2).

The target model plays the env itself: `rollouts` episodes per task at temperature 1.0, up to `max_env_steps` steps;
every step with a valid action becomes a triple <last `history` turns, state, action, next state>. Triples are split
90/10 at random, seeded (the paper; --val-split tasks: by task, so validation tasks are unseen); the validation part
trains filter.py's filter model.

  python collect.py --env alfworld --split train --model smollm2-135m --out-dir runs/collect
  torchrun --nproc_per_node 8 collect.py ...      # each rank plays a disjoint shard of (task, rollout) pairs

Expert data for the Early Experience baselines (RWML Table 2: imitation learning, IWM, SR): --policy expert plays
the env's gold action at every step (filter.py --agent-episodes: imitation learning); --alternatives K also takes
K alternative actions from every expert state, each in a fresh env that replays the episode's actions up to that
state (neither ALFWorld nor TextWorld-Express nor τ² can snapshot a game), and writes their transitions as
triples_alt.jsonl (filter.py: IWM's world-model SFT, SR's rationales).

  python collect.py --env alfworld --split train --policy expert --alternatives 3 --out-dir runs/expert

Outputs in out_dir: episodes.jsonl, triples.jsonl, triples_train.jsonl, triples_val.jsonl, stats.json,
metrics.jsonl (one row per finished episode), config.json; with --alternatives also branches.jsonl (each
episode's alternative steps) and triples_alt.jsonl. Resumable: each finished episode (and its branches) is appended
and fsynced at once (a rank writes episodes.rank{r}.jsonl, branches.rank{r}.jsonl under torchrun); a rerun of the
same command merges what is there, skips finished (task, rollout) pairs and plays the rest. Episodes whose env
crashed are played again.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (MetricsLogger, Sample, append_jsonl, check_resume, flag, init_distributed, load_model,
                    parse_settings, pick_tasks, print0, read_jsonl, read_jsonl_resumable, save_config, seed_everything,
                    write_jsonl)
from envs.base import EnvPool
from prompts import format_reply, parse_action
from rollout import (STEP_INFO, episode_triples, is_transition, make_suite, model_actor, run_episodes, step_messages,
                     strip_samples, transition_triple)


@dataclass
class Settings:
    """Collect agent rollouts and turn them into world-model triples (RWML §2.2)."""
    env: str = flag("alfworld", "environment", ["alfworld", "twx", "tau2"])
    split: str = flag("train", "env split (alfworld: train | valid_seen | valid_unseen)")
    model: str = flag("smollm2-135m", "tiny | smollm2-135m | HF id | checkpoint dir")
    rollouts: int = flag(3, "episodes per task (paper: 3)")
    max_env_steps: int = flag(30, "steps per episode (paper: 30)")
    history: int = flag(2, "past turns in each triple and the text-game agent prompt (paper: 2 ALFWorld, 5 τ²: pass "
                           "--history 5 with --env tau2; a τ² agent sees the whole conversation)")
    temperature: float = flag(1.0, "sampling temperature (paper: 1.0)")
    top_p: float = flag(1.0, "nucleus sampling")
    max_new_tokens: int = flag(512, "response length cap per step (paper: 512)")
    n_tasks: int | None = flag(None, "a seeded sample of this many tasks (none = all)")
    task_type: str | None = flag(None, "only tasks of this type (alfworld: e.g. pick_and_place_simple; twx: a game, "
                                       "e.g. coin; tau2: a domain, airline | retail | telecom)")
    user_model: str = flag("smollm2-135m", "τ² user simulator: a local model (tiny | smollm2-135m | HF id | path) or "
                                           "litellm:<name>, e.g. litellm:gpt-4.1; a comma list splits the rollouts "
                                           "into blocks (paper: 3 + 3 with two simulators)")
    seed: int = flag(0, "task sample, sampling, exploration and the train/val split")
    out_dir: str = flag("runs/collect", "episodes.jsonl, triples*.jsonl, stats.json, metrics.jsonl, config.json")
    batch_size: int = flag(16, "episodes played at once (one generate call per step)")
    n_workers: int = flag(0, "env worker processes (0 = envs in this process)")
    val_frac: float = flag(0.1, "fraction of the triples (or tasks) in triples_val")
    val_split: str = flag("triples", "triples: a seeded random 90/10 of the triples (paper); tasks: whole tasks on "
                                     "each side", ["triples", "tasks"])
    explore: float = flag(0.0, "probability that a step takes a random admissible action instead of the model's "
                               "(0 = paper; a model too small to follow the format yields no triples without it)")
    policy: str = flag("model", "who acts: model = --model's samples (paper); expert = the env's gold action "
                       "(ALFWorld: the walkthrough, then alfworld's hand-coded expert; TextWorld-Express: the gold "
                       "path; τ²: the task's required tool calls, then its `done` stop call), no model needed: Early "
                       "Experience's expert data", ["model", "expert"])
    alternatives: int = flag(0, "K: from every state where the episode took a valid action, also take K other "
                                "actions, each from a replay of the episode up to that state (IWM / SR data: "
                                "triples_alt.jsonl); 0 = off")
    alternative_source: str = flag("random", "random: K distinct admissible actions other than the one taken (text "
                                             "games); model: K samples of --model at --temperature from the agent's "
                                             "prompt (Early Experience's starting policy), distinct, other than the "
                                             "one taken; in text games the non-admissible ones are dropped unplayed "
                                             "(their triples would be)", ["random", "model"])


# settings that change what an episode is: a rerun into the same out_dir must keep them
SAME_ON_RESUME = ("env", "split", "model", "max_env_steps", "history", "temperature", "top_p", "max_new_tokens",
                  "task_type", "seed", "explore", "user_model", "policy", "alternatives",
                  "alternative_source")


def check_settings(s: Settings) -> None:
    bounds = {"rollouts": 1, "max_env_steps": 1, "history": 0, "max_new_tokens": 1, "batch_size": 1, "n_workers": 0,
              "alternatives": 0}
    bad = [f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(s, k)}" for k, lo in bounds.items()
           if getattr(s, k) < lo]
    if s.n_tasks is not None and s.n_tasks < 1:
        bad.append(f"--n-tasks must be >= 1 (or none for all), got {s.n_tasks}")
    if len(s.user_model.split(",")) > s.rollouts:
        bad.append(f"--user-model names {len(s.user_model.split(','))} simulators for --rollouts {s.rollouts}")
    if not 0 <= s.val_frac < 1:
        bad.append(f"--val-frac must be in [0, 1), got {s.val_frac}")
    if s.policy == "expert" and s.explore > 0:
        bad.append("--explore with --policy expert would mix random actions into the expert data")
    if s.alternatives and s.env == "tau2":
        bad.append("--alternatives on τ²: random alternatives need admissible actions, which τ² has not, and model "
                   "ones need the agent's prompt at each state, τ²'s live conversation, which episodes do not keep")
    if bad:
        raise SystemExit("; ".join(bad))


def user_model_of(s: Settings, rollout: int) -> str:
    """The user simulator of rollout r: with k comma-separated models, rollouts are split into k contiguous blocks
    (6 rollouts, "a,b": 0-2 play with a, 3-5 with b), so ids (task#rollout#t) never collide across simulators."""
    models = s.user_model.split(",")
    return models[rollout * len(models) // s.rollouts]


def merge_episodes(out: Path, name: str = "episodes") -> list[dict]:
    """name.jsonl + any name.rank*.jsonl -> one name.jsonl, one row per (task, rollout), sorted (episodes, and the
    branches of --alternatives). A later row wins: an episode retried after an env crash replaces its failed row."""
    rank_files = sorted(out.glob(f"{name}.rank*.jsonl"))
    rows = {}
    for path in [out / f"{name}.jsonl", *rank_files]:
        for e in read_jsonl_resumable(path):
            rows[(e["task_id"], e["rollout"])] = e
    episodes = [rows[k] for k in sorted(rows)]
    write_jsonl(out / f"{name}.jsonl", episodes)
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


def write_outputs(s: Settings, out: Path, episodes: list[dict], run: dict, branches: list[dict] | None = None) -> dict:
    triples = [t for e in episodes for t in episode_triples(e, s.history)]
    train, val = split_triples(triples, s.val_frac, s.seed, s.val_split)
    write_jsonl(out / "triples.jsonl", triples)
    write_jsonl(out / "triples_train.jsonl", train)
    write_jsonl(out / "triples_val.jsonl", val)
    stats = {**episode_stats(episodes), "triples_kept": len(triples),
             "triples_dropped": sum(e["n_steps"] for e in episodes) - len(triples),
             "triples_train": len(train), "triples_val": len(val), "this_run": run}
    if branches is not None:
        alt = alternative_triples(episodes, branches, s.history)
        write_jsonl(out / "triples_alt.jsonl", alt)
        stats["branching"] = {**branch_stats(branches), "triples_alt": len(alt)}
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


# τ² has no gold action once the task's required calls are made: the expert then ends the conversation with τ²'s
# stop tool (the gym agent's `done`); text games have none where their expert gave up
EXPERT_STOP = {"tau2": '{"name": "done", "arguments": {}}'}


def expert_actor(env: str):
    """The env's gold action every step (info["gold"]), in the agent's answer format with an empty thought. Without
    one (ALFWorld's hand-coded expert failed, TextWorld-Express off its gold path) an empty action: invalid, the
    game answers "Nothing happens." until --max-steps; τ² ends the conversation instead (EXPERT_STOP)."""
    def act(messages_list, infos):
        return [Sample([], [], format_reply(info.get("gold") or EXPERT_STOP.get(env, "")), [], True) for info in infos]
    return act


# ----------------------------------------------------------------------------------------------------------
# Branching (Early Experience): K alternative actions from every state where the episode took a valid action.
# No env here can snapshot a game, so each alternative runs in a fresh env that replays the episode's actions up
# to that state; the replay must give back the episode's observations, or the branch is dropped as diverged.

def propose(s: Settings, episode: dict, model_act) -> dict[int, list[tuple[str, bool]]]:
    """-> {t: [(alternative action, parsed)]} for every valid step t: up to K distinct actions other than the one
    taken. random: admissible ones, seeded by (seed, task, rollout, t); model: the starting policy's samples from
    the agent's prompt at t (text games keep the admissible ones only: the others' triples would be dropped)."""
    steps = episode["steps"]
    states = [t for t, step in enumerate(steps) if step["valid"]]
    if s.alternative_source == "random":
        picks = {}
        for t in states:
            others = [a for a in steps[t]["admissible"] if a != steps[t]["action"]]
            rng = random.Random(f"{s.seed}:{episode['task_id']}:{episode['rollout']}:{t}")
            picks[t] = [(a, True) for a in rng.sample(others, min(s.alternatives, len(others)))]
        return picks
    k = s.alternatives
    messages = [step_messages(episode, t, s.history) for t in states for _ in range(k)]
    samples = model_act(messages, [{"admissible": steps[t].get("admissible")} for t in states for _ in range(k)])
    picks = {}
    for i, t in enumerate(states):
        seen, chosen = {steps[t]["action"]}, []
        for sample in samples[i * k:(i + 1) * k]:
            action, parsed = parse_action(sample.text, steps[t].get("admissible"))
            if action and action not in seen and (parsed or not steps[t].get("admissible")):
                seen.add(action)
                chosen.append((action, parsed))
        picks[t] = chosen
    return picks


def play_branches(pool: EnvPool, episode: dict, picks: dict[int, list[tuple[str, bool]]], n_slots: int) -> dict:
    """Plays every alternative of one episode: reset, replay steps 0..t-1, take the alternative; branch i in pool
    slot i % n_slots (one slot per worker: they run in parallel, and each slot's env resets the same game over and
    over). -> the episode's branches row: {"task_id", "rollout", "alternatives": [{"t", "j", "step"}], "diverged",
    "errors", "replayed_steps", "wall_s"}; a step is shaped like an episode step (obs = the episode's state at t)."""
    steps = episode["steps"]
    branches = [(t, j, action, parsed) for t, alts in sorted(picks.items()) for j, (action, parsed) in enumerate(alts)]
    jobs, spans = [], []
    for i, (t, _, action, _) in enumerate(branches):
        start, slot = len(jobs), i % n_slots
        jobs += [("reset", slot, episode["task_id"])] + [("step", slot, st["action"]) for st in steps[:t]]
        jobs.append(("step", slot, action))
        spans.append((start, len(jobs)))
    t0 = time.perf_counter()
    results = pool.run(jobs) if jobs else []
    row = {"task_id": episode["task_id"], "rollout": episode["rollout"], "alternatives": [], "diverged": 0,
           "errors": 0, "replayed_steps": sum(t for t, *_ in branches)}
    for (t, j, action, parsed), (a, b) in zip(branches, spans):
        (obs0, info0), replay, (next_obs, reward, done, info) = results[a], results[a + 1:b - 1], results[b - 1]
        if info0.get("error") or any(r[3].get("error") for r in replay) or info.get("error"):
            row["errors"] += 1
            continue
        seen = [obs0] + [r[0] for r in replay]  # the replay must walk the episode's own states
        if seen != [st["obs"] for st in steps[:t]] + [steps[t]["obs"]]:
            row["diverged"] += 1
            continue
        step = {"obs": steps[t]["obs"], "action": action, "response": format_reply(action),
                "valid": parsed and bool(info.get("valid", True)), "next_obs": next_obs, "reward": float(reward),
                "done": bool(done)}
        step.update((k, info[k]) for k in STEP_INFO if k in info)
        row["alternatives"].append({"t": t, "j": j, "step": step})
    row["wall_s"] = round(time.perf_counter() - t0, 3)
    return row


def alternative_triples(episodes: list[dict], branches: list[dict], history: int) -> list[dict]:
    """IWM's triples: each alternative step as a triple of its state (the same state, history and instruction as
    the episode's own triple at t, id task#rollout#t#alt<j>), kept by the episode triples' rule (is_transition).
    meta also holds what SR compares against: the episode's own action and next state there, and the admissible
    actions (to rebuild the agent's prompt)."""
    by_key = {(e["task_id"], e["rollout"]): e for e in episodes}
    out = []
    for row in branches:
        episode = by_key.get((row["task_id"], row["rollout"]))
        if episode is None:
            continue
        for alt in row["alternatives"]:
            if not is_transition(alt["step"]):
                continue
            t, own = alt["t"], episode["steps"][alt["t"]]
            meta = {"alternative": alt["j"], "expert_action": own["action"], "expert_next_state": own["next_obs"]}
            if own.get("admissible"):
                meta["admissible"] = own["admissible"]
            out.append(transition_triple(episode, t, alt["step"], history, f"#alt{alt['j']}", meta))
    return out


def branch_stats(branches: list[dict]) -> dict:
    n_alt = sum(len(b["alternatives"]) for b in branches)
    states = sum(len({a["t"] for a in b["alternatives"]}) for b in branches)
    wall = sum(b["wall_s"] for b in branches)
    return {"episodes": len(branches), "states": states, "alternatives": n_alt,
            "diverged": sum(b["diverged"] for b in branches), "errors": sum(b["errors"] for b in branches),
            "replayed_steps": sum(b["replayed_steps"] for b in branches), "wall_s": round(wall, 2),
            "s_per_state": round(wall / states, 3) if states else None,
            "s_per_alternative": round(wall / n_alt, 3) if n_alt else None}


def branch(s: Settings, d, out: Path, suites: dict, model_act, metrics: MetricsLogger) -> None:
    """Every finished episode without a branches row gets one: this rank plays its shard, appending one fsynced
    row per episode (branches.rank{r}.jsonl under torchrun), so a killed run resumes where it stopped."""
    done = {(b["task_id"], b["rollout"]) for b in read_jsonl(out / "branches.jsonl")}
    todo = [e for e in read_jsonl(out / "episodes.jsonl")
            if "error" not in e and (e["task_id"], e["rollout"]) not in done][d.rank::d.world]
    print0(f"branching: {s.alternatives} {s.alternative_source} alternative(s) per valid step of {len(todo)} "
           f"episode(s) on rank 0, each from a replay of the episode")
    part = out / ("branches.jsonl" if d.world == 1 else f"branches.rank{d.rank}.jsonl")
    bar = tqdm(total=len(todo), desc=f"branch rank {d.rank}", disable=not d.main, dynamic_ncols=True)
    for user_model, suite in suites.items():
        mine = [e for e in todo if s.env != "tau2" or user_model_of(s, e["rollout"]) == user_model]
        if not mine:
            continue
        with EnvPool(suite, s.n_workers) as pool:
            for episode in mine:
                row = play_branches(pool, episode, propose(s, episode, model_act), max(1, s.n_workers))
                append_jsonl(part, [row])
                bar.update(1)
                metrics.log({"branched": f"{row['task_id']}#{row['rollout']}", **{k: v for k, v in row.items()
                             if k not in ("task_id", "rollout", "alternatives")},
                             "alternatives": len(row["alternatives"])})
    bar.close()


def main(s: Settings, act=None) -> dict | None:
    """act: a replacement for the model (tests play a scripted expert with it); None = sample from s.model."""
    check_settings(s)
    d = init_distributed()
    out = Path(s.out_dir)
    check_resume(s, out, SAME_ON_RESUME)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        merge_episodes(out)  # folds in what a killed run left (and drops a torn last line)
        merge_episodes(out, "branches")
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
    who = "expert" if s.policy == "expert" else s.model
    print0(f"collect {who} on {s.env}/{s.split}: {len(jobs)} episodes, {len(jobs) - len(all_todo)} already "
           f"done, {len(all_todo)} to play on {d.world} rank(s)")

    model_act = act
    all_explore = s.explore >= 1 and s.env != "tau2"  # text games list admissible actions: every step explores
    if model_act is None and ((s.policy == "model" and not all_explore)
                              or (s.alternatives and s.alternative_source == "model")):
        model, tok = load_model(s.model, device=d.device)
        generator = torch.Generator(device=d.device).manual_seed(s.seed + d.rank)
        model_act = model_actor(model, tok, s.temperature, s.max_new_tokens, s.top_p, generator=generator)
    if s.policy == "expert":
        act = expert_actor(s.env)
    elif model_act is None:
        def act(messages_list, infos):
            raise RuntimeError("--explore 1 asked the model for a step without admissible actions")
    else:
        act = model_act
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
                         env=s.env, split=s.split, model=who, max_env_steps=s.max_env_steps, history=s.history,
                         n_workers=s.n_workers, batch_size=s.batch_size, on_done=save)
    except KeyboardInterrupt:
        print0(f"\ninterrupted: {counts['episodes']} finished episodes are saved in {part}; rerun to resume")
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - start
    if dist.is_initialized():
        dist.barrier()
    if d.main:
        merge_episodes(out)
    if s.alternatives:
        if dist.is_initialized():
            dist.barrier()  # every rank reads the merged episodes
        branch(s, d, out, suites, model_act, metrics)
    if dist.is_initialized():
        dist.barrier()
    if not d.main:
        return None
    episodes = merge_episodes(out)
    played = set(all_todo)
    new = [e for e in episodes if (e["task_id"], e["rollout"]) in played]
    new_steps = sum(e["n_steps"] for e in new)
    run = {"episodes": len(new), "env_steps": new_steps, "wall_s": round(wall, 2),
           "generate_s_rank0": round(gen_s, 2), "world": d.world,
           "episodes_per_hour": round(len(new) / wall * 3600, 1) if new else None,
           "env_steps_per_s": round(new_steps / wall, 3) if new else None}
    stats = write_outputs(s, out, episodes, run, merge_episodes(out, "branches") if s.alternatives else None)
    metrics.log({"summary": stats})
    print0(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main(parse_settings(Settings))
