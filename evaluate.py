"""Evaluate checkpoints the way the paper does (RWML §4), one --what at a time:

  agent    play an env split with the model as the agent (30 steps; 3 sampled episodes per task at temperature 1.0,
           as Table 1 averages 3 runs; --greedy: one greedy episode): success rate with a 95% Wilson interval,
           its mean ± std over the rollouts, mean steps, invalid and inefficient action rates, overall and per
           task type. Resumable: episodes.jsonl grows one finished episode at a time, a rerun plays the rest.
  wm       world-model accuracy on held-out triples (triples_val.jsonl, or a seeded sample of --n-triples) under
           the RWML reward, with a 95% Wilson interval, by env and next_kind; predictions.jsonl keeps every answer.
  weights  the fraction of parameters a checkpoint changed against its base model (paper §4.2), per transformer
           layer and per module type.
  forgetting  general ability (paper §4.2, Table 3): mean per-token NLL of the reference answers of a fixed probe
           (data/general_probe.jsonl) and how many greedy answers contain one; with --lm-eval-tasks, also those
           lm-eval benchmarks (the paper's: MMLU-Redux, IFEval, MATH-500, GSM8K, GPQA-Diamond; offline: the local
           tasks in data/lm_eval) on the same loaded model, each metric with its stderr.
  arms     all of the above for several models in one process: each model and the reward embedder load once;
           results land in out_dir/<arm>/<evaluation>/ and a rerun skips the evaluations already finished.
           --checkpoints all: also the wm and agent evaluations of each earlier checkpoint of an arm given as a
           training run dir, into out_dir/<arm>/checkpoints/step_N/<evaluation>/.
  report   one table of every arm, the stage times, training curves, world-model accuracy against task success
           (one point per arm, a line through its evaluated checkpoints), summary.json (+ the detailed tables).

agent / wm / weights / forgetting write out_dir/results.json (+ config.json); report reads every results.json under
each run dir.

  python evaluate.py --what agent --model runs/rwml/ckpt/step_000100 --env alfworld --split valid_seen \
      --out-dir runs/eval/rwml/alfworld_valid_seen
  python evaluate.py --what wm --model runs/rwml/ckpt/step_000100 --triples runs/collect/triples_val.jsonl \
      --out-dir runs/eval/rwml/wm
  python evaluate.py --what weights --model runs/rwml/ckpt/step_000100 --base smollm2-135m --out-dir runs/eval/rwml/weights
  python evaluate.py --what forgetting --model runs/rwml --lm-eval-tasks rwml_general_mc,rwml_general_gen \
      --lm-eval-include data/lm_eval --out-dir runs/eval/rwml/forgetting
  python evaluate.py --what arms --arms base=smollm2-135m,rwml=runs/rwml --triples runs/collect/triples_val.jsonl \
      --n-triples 200 --n-tasks 10 --out-dir runs/eval
  python evaluate.py --what report --runs base=runs/eval/base,rwml=runs/eval/rwml --curves rwml=runs/rwml \
      --stages runs --out-dir runs/report
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from common import (TRIPLE_KEYS, _resolve, append_jsonl, chat_ids, check_resume, compute_dtype, flag, generate,
                    latest_checkpoint, load_model, parse_settings, pick_tasks, read_jsonl, read_jsonl_resumable,
                    sample_rows, save_config, seed_everything, sequence_logprobs, write_jsonl)

PROBE = Path(__file__).resolve().parent / "data" / "general_probe.jsonl"


@dataclass
class Settings:
    """Evaluate a checkpoint (agent success, world-model accuracy, weight change) or write a report."""
    what: str = flag("agent", "what to evaluate", ["agent", "wm", "weights", "forgetting", "arms", "report"])
    model: str = flag("smollm2-135m", "tiny | smollm2-135m | HF id | checkpoint dir")
    out_dir: str = flag("runs/eval", "results.json, config.json (+ episodes.jsonl / predictions.jsonl)")
    seed: int = flag(0, "task and triple samples, sampling")
    # agent
    env: str = flag("alfworld", "environment", ["alfworld", "twx", "tau2"])
    split: str = flag("valid_seen", "alfworld: train | valid_seen (ID) | valid_unseen (OOD)")
    n_tasks: int | None = flag(None, "a seeded sample of this many tasks (none = all)")
    rollouts: int = flag(3, "episodes per task (paper: Table 1 is the mean of 3 runs)")
    greedy: bool = flag(False, "one greedy episode per task (sets --temperature 0 --rollouts 1)")
    max_env_steps: int = flag(30, "steps per episode (paper: 30 at evaluation)")
    history: int = flag(2, "past turns in the text-game agent prompt (paper: 2; a τ² agent sees the whole "
                           "conversation)")
    n_workers: int = flag(0, "env worker processes (0 = in this process)")
    task_type: str | None = flag(None, "only tasks of this type (alfworld: e.g. pick_and_place_simple; twx: a game; "
                                       "tau2: a domain, airline | retail | telecom)")
    user_model: str = flag("smollm2-135m", "τ² user simulator: a local model (tiny | smollm2-135m | HF id | path) or "
                                           "litellm:<name> (paper's official eval: litellm:gpt-4.1)")
    # generation (agent and wm)
    temperature: float | None = flag(None, "0 = greedy; none = 1.0 for agent (the paper samples at 1.0 in "
                                           "collection and RL; it does not state eval's), greedy for wm")
    top_p: float = flag(1.0, "nucleus sampling")
    max_new_tokens: int = flag(512, "response length cap (paper: 512)")
    batch_size: int = flag(16, "episodes played / prompts generated at once")
    precision: str | None = flag(None, "generation and scoring dtype; none = bf16 on CUDA, fp32 on CPU",
                                 ["fp32", "bf16"])
    # wm
    triples: str = flag("", "held-out triples JSONL (collect.py's triples_val.jsonl)")
    n_triples: int | None = flag(None, "a seeded random sample of this many triples (none = all)")
    wm_prompt: str = flag("rwml", "the prompt the checkpoint was trained with: rwml = reason then predict; sft = the "
                                  "WM SFT prompt (filter.py --sft-prompt paper)", ["rwml", "sft"])
    embedder: str = flag("minilm", "minilm | sentence-transformers id (paper: Qwen/Qwen3-Embedding-8B)")
    embed_instruction: str = flag("auto", "truth-side instruction: auto (if an instruct embedder) | none | text")
    tau_d: float = flag(0.2, "RWML threshold for observations (paper: 0.2 ALFWorld)")
    tau_d_user: float = flag(0.4, "RWML threshold for τ² user replies (paper: 0.4)")
    max_state_tokens: int = flag(100, "truncate predictions before scoring (100 ALFWorld, 512 τ²)")
    # weights
    base: str = flag("", "base model the checkpoint started from: a dir (streamed, e.g. a 7B's local snapshot) or a "
                         "name (loaded on CPU)")
    eta: float = flag(1e-3, "relative change threshold (paper §4.2: 1e-3)")
    # forgetting
    probe: str = flag(str(PROBE), "general-ability probe JSONL: id, prompt, answer (whose NLL is measured), accept "
                                  "(strings a correct greedy answer contains)")
    probe_max_new_tokens: int = flag(32, "greedy answer length for the contains check")
    lm_eval_tasks: str = flag("", "lm-eval tasks run beside the probe, as lm-eval names them, comma-separated (paper "
                                  "Table 3: mmlu_redux_generative,ifeval,minerva_math500,gsm8k,gpqa_diamond_cot_zeroshot; "
                                  "their datasets need the hub; offline: rwml_general_mc,rwml_general_gen with "
                                  "--lm-eval-include data/lm_eval); '' = none")
    lm_eval_include: str = flag("", "a folder of local lm-eval task YAMLs (lm-eval's include_path), e.g. data/lm_eval")
    lm_eval_limit: int | None = flag(None, "examples per lm-eval task (none = all; a limit is a smoke test, not a "
                                           "benchmark score)")
    lm_eval_chat: bool = flag(True, "lm-eval prompts through the chat template (instruct models, as the paper's)")
    # arms: every evaluation of several models in one process
    arms: str = flag("", "name=model,... (names: base, wm_sft, rwml, policy, rwml_policy, wm_sft_policy); results in "
                         "out_dir/<name>/<evaluation>/")
    evals: str = flag("wm,forgetting,agent,weights", "evaluations each arm runs")
    agent_splits: str = flag("valid_seen,valid_unseen", "env splits each arm plays")
    start_arm: str = flag("base", "the arm the others started from: its model is the default --base, and the report "
                                  "gives each arm's forgetting NLL as a change against it")
    checkpoints: str = flag("last", "last = each arm's model; all = also each earlier checkpoint (ckpt/step_*) of an "
                                    "arm given as a training run dir, for its wm and agent evaluations, into "
                                    "out_dir/<arm>/checkpoints/step_N/ (the report's wm_vs_success.png draws them "
                                    "as the arm's line)", ["last", "all"])
    # report
    runs: str = flag("", "name=eval_dir,... : table rows, each from the results.json files under eval_dir")
    curves: str = flag("", "name=run_dir_or_metrics.jsonl,... : training curves to plot")
    stages: str = flag("", "the pipeline's out dir: its */DONE files (run.sh writes '<N> s') give the stage times")


def eval_model(s: Settings, name: str):
    """-> (model, tokenizer) in the --precision compute dtype."""
    return load_model(name, dtype=compute_dtype(s.precision))


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def finished(s: Settings, keys: tuple[str, ...]) -> dict | None:
    """The results.json of this evaluation when out_dir already holds it, finished with the same `keys` settings (a
    rerun skips it); None when it still has to run. A run with other settings there is an error (check_resume)."""
    out = Path(s.out_dir)
    check_resume(s, out, keys)
    path = out / "results.json"
    if not path.exists():
        return None
    print(f"{s.what} eval of {s.model}: already done -> {out}")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------
# Agent: success, steps, invalid and inefficient actions

INFO_VERBS = ("look", "inventory", "examine")  # ALFWorld / TextWorld-Express commands that only read the world
PAPER_INEFFICIENT_VERBS = ("look", "examine")  # the paper's inefficient actions (§4): every one of them counts


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a success rate: honest at small n and at 0% / 100%, unlike p ± z·se.
    n = 0 says nothing: (0, 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, round(center - half, 12)), min(1.0, round(center + half, 12))  # no 1e-17 float dust at 0 / n


def inefficient_steps(steps: list[dict]) -> list[bool]:
    """Per step: was it an inefficient action? A step is inefficient when
      1. it is valid and only gathers information: its action's first word is look, inventory or examine, and
      2. the env answered it with exactly the text (next_obs) it gave the last time the same action (compared
         stripped, lowercased) was taken earlier in this episode: the repeat told the agent nothing new.
    So the first look / inventory / examine X is never inefficient, a second "examine desk 1" after the agent
    put something on desk 1 is not either (the answer changed), and invalid steps count as invalid only."""
    last_answer: dict[str, str] = {}
    flags = []
    for step in steps:
        action = step["action"].strip().lower()
        info = bool(step["valid"]) and action.split(" ", 1)[0] in INFO_VERBS
        flags.append(info and last_answer.get(action) == step["next_obs"])
        if info:
            last_answer[action] = step["next_obs"]
    return flags


def paper_inefficient(step: dict) -> bool:
    """The paper's count: a valid look / examine action is inefficient, whatever it answered (invalid steps count
    as invalid only). inefficient_steps is the stricter count: only repeats that learned nothing new."""
    return bool(step["valid"]) and step["action"].strip().lower().split(" ", 1)[0] in PAPER_INEFFICIENT_VERBS


def rollout_success(episodes: list[dict]) -> dict:
    """Success rate of each rollout index (rollout r of every task: one run of the benchmark, as Table 1 averages 3
    runs), and their mean and sample std (0 for one rollout)."""
    by_rollout = defaultdict(list)
    for e in episodes:
        by_rollout[e.get("rollout", 0)].append(bool(e["success"]))
    rates = [sum(v) / len(v) for _, v in sorted(by_rollout.items())]
    mean = sum(rates) / len(rates) if rates else None
    std = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1)) if len(rates) > 1 else 0.0
    return {"success_by_rollout": rates, "success_mean": mean, "success_std": std if rates else None}


def agent_stats(episodes: list[dict]) -> dict:
    """Success (with a 95% Wilson interval on the pooled count, and mean ± std over the rollouts), mean steps, and
    per-step invalid / inefficient rates, pooled; inefficient both ways (inefficient_steps, and the paper's).
    An episode whose env crashed (episode["error"], success False) counts as a failure; n_errors says how many."""
    n = len(episodes)
    wins = sum(bool(e["success"]) for e in episodes)
    steps = sum(len(e["steps"]) for e in episodes)
    invalid = sum(not st["valid"] for e in episodes for st in e["steps"])
    inefficient = sum(sum(inefficient_steps(e["steps"])) for e in episodes)
    inefficient_paper = sum(paper_inefficient(st) for e in episodes for st in e["steps"])
    lo, hi = wilson_interval(wins, n)
    rate = (lambda k: k / steps) if steps else (lambda k: None)
    # τ² (paper §4: invalid tool calls per call): a tool call is a step the env took as one (next_kind "tool")
    # with a non-empty action; an empty action (no <action> block) is a format error, counted in invalid_rate only
    calls = [st for e in episodes for st in e["steps"] if st.get("next_kind") == "tool" and st["action"]]
    bad_calls = sum(not st["valid"] for st in calls)
    return {"n_episodes": n, "n_tasks": len({e.get("task_id") for e in episodes}), "n_success": wins,
            "success": wins / n if n else None, "success_ci95": [lo, hi], **rollout_success(episodes),
            "mean_steps": steps / n if n else None, "n_steps": steps, "invalid_rate": rate(invalid),
            "inefficient_rate": rate(inefficient), "invalid_or_inefficient_rate": rate(invalid + inefficient),
            "inefficient_rate_paper": rate(inefficient_paper),
            "invalid_or_inefficient_rate_paper": rate(invalid + inefficient_paper),
            "n_tool_calls": len(calls), "invalid_tool_call_rate": bad_calls / len(calls) if calls else None,
            "n_errors": sum("error" in e for e in episodes)}


def agent_results(episodes: list[dict]) -> dict:
    """Pooled stats plus the same per task type (ALFWorld's 6 task types, τ²'s domains). success is pass^1: the
    mean over all n_episodes = n_tasks x trials (--rollouts) episodes."""
    groups = defaultdict(list)
    for e in episodes:
        groups[e.get("task_type") or "unknown"].append(e)
    return {**agent_stats(episodes), "by_task_type": {k: agent_stats(v) for k, v in sorted(groups.items())}}


def evaluate_agent(s: Settings, lm=None) -> dict:
    """lm: a callable -> (model, tokenizer), called only when episodes are left to play (default: load s.model)."""
    from tqdm import tqdm

    from rollout import make_suite, model_actor, run_episodes, strip_samples

    if s.greedy:   # resolved before config.json and the resume check, so both see what was run
        s.temperature, s.rollouts = 0.0, 1
    if s.n_tasks is not None and s.n_tasks < 1 or s.rollouts < 1:
        raise SystemExit(f"--n-tasks ({s.n_tasks}) and --rollouts ({s.rollouts}) must be at least 1")
    out = Path(s.out_dir)
    check_resume(s, out, ("model", "env", "split", "max_env_steps", "history", "temperature", "top_p",
                          "max_new_tokens", "seed", "task_type", "user_model"))
    save_config(s, out)
    suite = make_suite(s.env, s.split, task_type=s.task_type, user_model=s.user_model, n_workers=s.n_workers)
    jobs = [(task_id, r) for task_id in pick_tasks(suite.task_ids, s.n_tasks, s.seed) for r in range(s.rollouts)]
    path = out / "episodes.jsonl"
    # a later row wins: an episode whose env crashed (episode["error"]) is played again and its new row replaces it
    done = {(e["task_id"], e["rollout"]): e for e in read_jsonl_resumable(path)}
    todo = [job for job in jobs if job not in done or "error" in done[job]]
    print(f"agent eval {s.model} on {s.env}/{s.split}: {len(jobs)} episodes, {len(jobs) - len(todo)} already done")
    if todo:
        model, tok = (lm or (lambda: eval_model(s, s.model)))()
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed)
        act = model_actor(model, tok, s.temperature, s.max_new_tokens, s.top_p, generator=gen)
        bar = tqdm(total=len(todo), desc=f"eval {s.env}/{s.split}", dynamic_ncols=True)

        def save(episode: dict) -> None:  # one fsynced line per finished episode: a kill loses only the live ones
            episode = strip_samples(episode)
            append_jsonl(path, [episode])
            done[(episode["task_id"], episode["rollout"])] = episode
            bar.update(1)

        try:
            run_episodes(act, suite, todo, env=s.env, split=s.split, model=s.model, max_env_steps=s.max_env_steps,
                         history=s.history, n_workers=s.n_workers, batch_size=s.batch_size, on_done=save)
        finally:
            bar.close()
        write_jsonl(path, list(done.values()))  # one row per (task, rollout): replayed crash rows replace the old
    results = {"what": "agent", "model": s.model, "env": s.env, "split": s.split, "trials": s.rollouts,
               **agent_results([done[job] for job in jobs])}
    write_json(out / "results.json", results)
    ci = results["success_ci95"]
    print(f"success {results['success']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (per rollout {results['success_mean']:.3f} ± "
          f"{results['success_std']:.3f})  mean steps {results['mean_steps']:.1f}  invalid "
          f"{results['invalid_rate']:.3f}  inefficient {results['inefficient_rate']:.3f} (paper's count "
          f"{results['inefficient_rate_paper']:.3f})  -> {out}")
    for kind, r in results["by_task_type"].items():
        bad_calls = "" if r["invalid_tool_call_rate"] is None else \
            f"  invalid tool calls {r['invalid_tool_call_rate']:.3f} of {r['n_tool_calls']}"
        print(f"  {kind}: success {r['success']:.3f} ({r['n_tasks']} tasks x {s.rollouts} trials){bad_calls}")
    return results


# ----------------------------------------------------------------------------------------------------------
# World model: one prediction per held-out triple, scored by the RWML reward

# what a finished wm evaluation must share with a rerun to be reused
WM_KEYS = ("model", "triples", "n_triples", "seed", "temperature", "top_p", "max_new_tokens", "embedder", "tau_d",
           "tau_d_user", "max_state_tokens", "wm_prompt", "embed_instruction", "precision")


def wm_stats(rows: list[dict]) -> dict:
    """accuracy = mean reward (binary for observations and user replies; snapped ROUGE-L for τ² tool replies);
    k = triples with reward 1, and ci95 its Wilson interval (the same rate when there are no tool replies)."""
    n = len(rows)
    k = sum(r["reward"] == 1.0 for r in rows)
    return {"n": n, "k": k, "ci95": list(wilson_interval(k, n)),
            "accuracy": sum(r["reward"] for r in rows) / n if n else None,
            "missing_rate": sum(r["prediction"] == "none" for r in rows) / n if n else None}


def wm_results(rows: list[dict]) -> dict:
    def by(key: str) -> dict:
        return {k: wm_stats([r for r in rows if r[key] == k]) for k in sorted({r[key] for r in rows})}
    return {**wm_stats(rows), "by_env": by("env"), "by_next_kind": by("next_kind")}


def make_reward(s: Settings):
    from rewards import WorldModelReward
    return WorldModelReward(s.embedder, s.tau_d, s.max_state_tokens, tau_d_user=s.tau_d_user,
                            embed_instruction=s.embed_instruction)


def evaluate_wm(s: Settings, lm=None, reward=None) -> dict:
    """lm: a callable -> (model, tokenizer), reward: a callable -> WorldModelReward, each called only if the
    evaluation still has to run (defaults: load s.model, build the reward from s)."""
    from prompts import extract_next_state, wm_messages

    if not s.triples:
        raise SystemExit("--what wm needs --triples (a triples JSONL, e.g. collect.py's triples_val.jsonl)")
    if s.n_triples is not None and s.n_triples < 1:
        raise SystemExit(f"--n-triples ({s.n_triples}) must be at least 1")
    if done := finished(s, WM_KEYS):
        return done
    out = Path(s.out_dir)
    save_config(s, out)
    triples = sample_rows(read_jsonl(s.triples, required=TRIPLE_KEYS), s.n_triples, s.seed)
    model, tok = (lm or (lambda: eval_model(s, s.model)))()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed)
    t0 = time.perf_counter()
    samples = generate(model, tok, [chat_ids(tok, wm_messages(t, s.wm_prompt)) for t in triples], s.max_new_tokens,
                       s.temperature, s.top_p, s.batch_size, generator=gen, progress=True)
    time_generate = time.perf_counter() - t0
    del model  # single evaluation: the embedder needs the memory more now (--what arms keeps it in lm)
    scores = (reward or (lambda: make_reward(s)))()([x.text for x in samples], triples).tolist()
    rows = [{"id": t["id"], "env": t["env"], "next_kind": t["next_kind"], "reward": r,
             "prediction": extract_next_state(x.text), "next_state": t["next_state"], "response": x.text,
             "finished": x.finished} for t, x, r in zip(triples, samples, scores)]
    write_jsonl(out / "predictions.jsonl", rows)
    results = {"what": "wm", "model": s.model, "triples": s.triples, "wm_prompt": s.wm_prompt, "embedder": s.embedder, "tau_d": s.tau_d,
               "tau_d_user": s.tau_d_user, "seed": s.seed, "time_generate": time_generate,
               "triples_per_s": len(rows) / time_generate, **wm_results(rows)}
    write_json(out / "results.json", results)
    lo, hi = results["ci95"]
    print(f"world-model accuracy {results['accuracy']:.3f} ({results['k']}/{results['n']} right, 95% CI "
          f"[{lo:.3f}, {hi:.3f}]; missing <next_state>: {results['missing_rate']:.3f}; "
          f"{results['triples_per_s']:.2f} triples/s generated) -> {out}")
    return results


# ----------------------------------------------------------------------------------------------------------
# Forgetting (paper §4.2, Table 3): how well each model still answers general questions: a fixed probe, and the
# lm-eval benchmarks --lm-eval-tasks names

PROBE_KEYS = ("id", "prompt", "answer", "accept")
FORGETTING_KEYS = ("model", "probe", "probe_max_new_tokens", "precision", "lm_eval_tasks", "lm_eval_include",
                   "lm_eval_limit", "lm_eval_chat")


def contains_answer(response: str, accept: list[str]) -> bool:
    """Does the response hold one of the accepted answers as whole words (case-insensitive)? "7" is in "It is 7."
    but not in "17"."""
    text = response.lower()
    return any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", text) for a in accept)


def probe_rows(model, tok, probe: list[dict], max_new_tokens: int, batch_size: int) -> list[dict]:
    """Per question: the summed NLL of the reference answer after the chat prompt (teacher-forced, the way the
    model would have to write it) and whether the model's own greedy answer contains an accepted string."""
    prompts = [chat_ids(tok, [{"role": "user", "content": q["prompt"]}]) for q in probe]
    answers = [tok(q["answer"], add_special_tokens=False)["input_ids"] for q in probe]
    logps = sequence_logprobs(model, prompts, answers, pad_id=tok.pad_token_id, batch_size=batch_size)
    samples = generate(model, tok, prompts, max_new_tokens, 0.0, batch_size=batch_size)
    return [{"id": q["id"], "nll": -float(lp.sum()), "n_tokens": len(a), "response": x.text,
             "correct": contains_answer(x.text, q["accept"])}
            for q, a, lp, x in zip(probe, answers, logps, samples)]


def forgetting_results(rows: list[dict]) -> dict:
    """nll: mean per-token NLL over all reference-answer tokens pooled (lower = the general answers are still
    likely); contains: greedy answers holding an accepted string, with a 95% Wilson interval."""
    n_tokens = sum(r["n_tokens"] for r in rows)
    k = sum(r["correct"] for r in rows)
    return {"n": len(rows), "n_tokens": n_tokens, "nll": sum(r["nll"] for r in rows) / n_tokens,
            "contains": {"k": k, "n": len(rows), "ci95": list(wilson_interval(k, len(rows)))}}


def lm_eval_tasks(names: list[str], include: str):
    """-> (lm-eval's TaskManager, {name: what lm-eval built for it: its task, its group, or a tag's tasks}). Built
    here, before the model loads, so that a missing data file or an unreachable hub dataset fails first. The
    manager indexes the --lm-eval-include folder alone when it holds every name (indexing lm-eval's own ~15k task
    YAMLs takes ~15 s), else lm-eval's tasks too. A missing folder or an unknown name is an error naming it."""
    from importlib.metadata import version

    from lm_eval.tasks import TaskManager
    if include and not Path(include).is_dir():
        raise SystemExit(f"--lm-eval-include {include}: no such folder")
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not all(n in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include or None)
    if unknown := [n for n in names if n not in manager.all_tasks]:
        where = f"lm-eval {version('lm_eval')}'s tasks" + (f" nor in {include}" if include else
                                                             " (local task YAMLs: --lm-eval-include DIR)")
        raise SystemExit(f"--lm-eval-tasks: unknown task {', '.join(map(repr, unknown))}: not in {where}")
    built = {}
    for name in names:
        loaded = manager.load([name])
        top = loaded["groups"][name] if name in loaded["groups"] else loaded["tasks"].get(name)
        built[name] = [top] if top is not None else list(loaded["tasks"].values())
    return manager, built


def lm_eval_scores(res: dict, name: str) -> dict:
    """One task's numbers from lm-eval's simple_evaluate output: metrics {"<metric>,<filter>" (lm-eval's key):
    {"value", "stderr"}} of the task (or group) itself, the same for every subtask under parts, and n, the examples
    scored. A stderr lm-eval did not compute ("N/A", or nan) is None."""
    def number(x):
        return x if isinstance(x, (int, float)) and math.isfinite(x) else None

    def metrics(row: dict) -> dict:
        out = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if sep and not metric.endswith("_stderr"):
                out[key] = {"value": number(value), "stderr": number(row.get(f"{metric}_stderr,{filt}"))}
        return out
    results = res["results"]
    return {"metrics": metrics(results.get(name, {})),
            "parts": {k: metrics(v) for k, v in results.items() if k != name},
            "n": sum(v["effective"] for v in res["n-samples"].values())}


def value_stderr(m: dict) -> str:
    """An lm-eval metric as "value ± stderr" (lm-eval's units; "–" where it has none)."""
    def num(x):
        return "–" if x is None else f"{x:.3f}"
    return f"{num(m['value'])} ± {num(m['stderr'])}"


def run_lm_eval(s: Settings, model, tok, tasks: tuple, out: Path) -> dict[str, dict]:
    """Each lm-eval task (tasks: lm_eval_tasks' output) on the already-loaded model (lm-eval's HF wrapper around
    it, no second copy); a finished task is appended to out/lm_eval.jsonl at once, so a rerun after a kill runs only
    the rest."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    manager, built = tasks
    path = out / "lm_eval.jsonl"
    done = {r["task"]: r for r in read_jsonl_resumable(path)}
    todo = [name for name in built if name not in done]
    if todo:
        wrapped = HFLM(pretrained=model, tokenizer=tok, batch_size=s.batch_size)
        for name in tqdm(todo, desc="lm-eval", dynamic_ncols=True):
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(model=wrapped, tasks=built[name], task_manager=manager,
                                          limit=s.lm_eval_limit, apply_chat_template=s.lm_eval_chat,
                                          log_samples=False, random_seed=s.seed)
            done[name] = {"task": name, **lm_eval_scores(res, name), "seconds": round(time.perf_counter() - t0, 1)}
            append_jsonl(path, [done[name]])
    return {name: {k: v for k, v in done[name].items() if k != "task"} for name in built}


def evaluate_forgetting(s: Settings, lm=None) -> dict:
    """lm: a callable -> (model, tokenizer), called only if the evaluation still has to run."""
    if done := finished(s, FORGETTING_KEYS):
        return done
    out = Path(s.out_dir)
    save_config(s, out)
    probe = read_jsonl(s.probe, required=PROBE_KEYS)
    for n, q in enumerate(probe, 1):
        if not (isinstance(q["accept"], list) and q["accept"] and all(isinstance(a, str) and a for a in q["accept"])):
            raise ValueError(f"{s.probe}:{n}: accept must be a non-empty list of non-empty strings")
    names = [t.strip() for t in s.lm_eval_tasks.split(",") if t.strip()]
    tasks = lm_eval_tasks(names, s.lm_eval_include) if names else None
    model, tok = (lm or (lambda: eval_model(s, s.model)))()
    rows = probe_rows(model, tok, probe, s.probe_max_new_tokens, s.batch_size)
    write_jsonl(out / "answers.jsonl", rows)
    results = {"what": "forgetting", "model": s.model, "probe": s.probe, **forgetting_results(rows),
               "lm_eval": run_lm_eval(s, model, tok, tasks, out) if tasks else {}}
    write_json(out / "results.json", results)
    c = results["contains"]
    print(f"general probe: NLL {results['nll']:.3f} per token over {results['n_tokens']} tokens, "
          f"{c['k']}/{c['n']} greedy answers right -> {out}")
    for name, r in results["lm_eval"].items():
        print(f"  {name} (n={r['n']}): " + ", ".join(f"{key} {value_stderr(m)}" for key, m in r["metrics"].items()))
    return results


# ----------------------------------------------------------------------------------------------------------
# Weight change (paper §4.2): which parameters did training move, relative to their size?

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weight_change(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], eta: float = 1e-3) -> dict:
    """Fraction of parameters with |ŵ − w| > η·max(|w|, |ŵ|) (w from `base`, ŵ from `tuned`), overall, per
    transformer layer (names with ".layers.<i>.") and per module type (q/k/v/o_proj, gate/up/down_proj; every
    other tensor, e.g. embeddings and norms, is "other"). Tensors are fetched one at a time, so lazy mappings
    (SafetensorsDir) keep memory to one tensor pair. Names in only one of the two are listed, not compared."""
    counts = defaultdict(lambda: [0, 0])  # group -> [changed, total]
    shared = [name for name in tuned if name in base]
    if not shared:
        raise ValueError("weight_change: the two models share no parameter names")
    for name in shared:
        w, w_hat = base[name].float(), tuned[name].float()
        if w.shape != w_hat.shape:
            raise ValueError(f"weight_change: {name} has shape {tuple(w.shape)} in the base, {tuple(w_hat.shape)} tuned")
        changed = int(((w_hat - w).abs() > eta * torch.maximum(w.abs(), w_hat.abs())).sum())
        layer = re.search(r"\.layers\.(\d+)\.", name)
        module = next((m for m in MODULES if f".{m}." in f".{name}."), "other")
        for group in ("all", f"module {module}") + ((f"layer {int(layer[1])}",) if layer else ()):
            counts[group][0] += changed
            counts[group][1] += w.numel()
    frac = {group: c / t for group, (c, t) in counts.items()}
    layers = sorted(int(g.split()[1]) for g in counts if g.startswith("layer "))
    return {"eta": eta, "overall": frac["all"], "n_params": counts["all"][1], "n_changed": counts["all"][0],
            "by_layer": {str(i): frac[f"layer {i}"] for i in layers},
            "by_module": {m: frac[f"module {m}"] for m in MODULES + ("other",) if f"module {m}" in frac},
            "only_in_base": sorted(set(base) - set(tuned)), "only_in_tuned": sorted(set(tuned) - set(base))}


class SafetensorsDir(Mapping):
    """A model dir's *.safetensors as a read-only mapping name -> tensor that reads one tensor per lookup."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self.files = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(f, "pt") as handle:
                self.files.update((name, f) for name in handle.keys())
        if not self.files:
            raise FileNotFoundError(f"{path}: no *.safetensors files")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.files[name], "pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def model_weights(name: str) -> Mapping[str, torch.Tensor]:
    """A model dir with safetensors (also a run dir: its newest checkpoint; smollm2-135m: its converted copy) is
    streamed tensor by tensor; any other name (tiny, a HF id) is loaded whole on CPU in fp32, so give a large base
    model as its local snapshot dir."""
    path = Path(name).expanduser()
    if name == "smollm2-135m" or path.is_dir() and not any(path.glob("*.safetensors")):
        path = Path(_resolve(name))
    if path.is_dir() and any(path.glob("*.safetensors")):
        return SafetensorsDir(path)
    return load_model(name, dtype=torch.float32, device="cpu")[0].state_dict()


WEIGHTS_KEYS = ("model", "base", "eta")


def evaluate_weights(s: Settings, base_weights=None) -> dict:
    """base_weights: a callable -> the base's weights (default: model_weights(s.base)), called only if the
    evaluation still has to run."""
    if not s.base:
        raise SystemExit("--what weights needs --base (the model the checkpoint was trained from)")
    if done := finished(s, WEIGHTS_KEYS):
        return done
    out = Path(s.out_dir)
    save_config(s, out)
    base = (base_weights or (lambda: model_weights(s.base)))()
    results = {"what": "weights", "model": s.model, "base": s.base, **weight_change(base, model_weights(s.model), s.eta)}
    write_json(out / "results.json", results)
    print(f"changed {results['overall']:.4f} of {results['n_params']:,} parameters (eta {s.eta}) -> {out}")
    return results


# ----------------------------------------------------------------------------------------------------------
# Arms: every evaluation of every model in one process

EVALS = ("wm", "forgetting", "agent", "weights")


def evaluate_arms(s: Settings) -> dict[str, dict]:
    """For each arm, the --evals evaluations into out_dir/<arm>/{wm, forgetting, <env>_<split>, weights}/, the
    layout --what report reads. Each arm's model is loaded once, and only if one of its evaluations still has to
    run; the reward embedder is built once for all arms (its cache of the truths' embeddings with it), and so are
    the base weights. The start arm (the model --base names) is not compared with itself."""
    arms = [(name, str(model)) for name, model in parse_pairs(s.arms, "--arms")]
    names = [name for name, _ in arms]
    if not arms or len(set(names)) < len(names):
        raise SystemExit(f"--arms: expected name=model,... with distinct names, got {s.arms!r}")
    evals = [e.strip() for e in s.evals.split(",") if e.strip()]
    if bad := [e for e in evals if e not in EVALS]:
        raise SystemExit(f"--evals: unknown {bad}; choose from {', '.join(EVALS)}")
    splits = [x.strip() for x in s.agent_splits.split(",") if x.strip()]
    if "agent" in evals and not splits:
        raise SystemExit("--evals agent needs --agent-splits (e.g. valid_seen,valid_unseen)")
    base = s.base or dict(arms).get(s.start_arm, "")
    if "weights" in evals and not base:
        raise SystemExit(f"--evals weights needs --base or an arm named {s.start_arm!r} (--start-arm)")
    if "wm" in evals and not s.triples:
        raise SystemExit("--evals wm needs --triples (a triples JSONL, e.g. collect.py's triples_val.jsonl)")
    out = Path(s.out_dir)
    save_config(s, out)
    reward = functools.cache(lambda: make_reward(s))
    base_weights = functools.cache(lambda: model_weights(base))
    results = {}
    for name, model in arms:
        lm = functools.cache(lambda model=model: eval_model(s, model))

        def sub(what: str, folder: str, model: str = model, **kw) -> Settings:
            return dataclasses.replace(s, what=what, model=model, out_dir=str(out / name / folder), **kw)
        got = {}
        if "wm" in evals:
            got["wm"] = evaluate_wm(sub("wm", "wm"), lm, reward)
        if "forgetting" in evals:
            got["forgetting"] = evaluate_forgetting(sub("forgetting", "forgetting"), lm)
        if "agent" in evals:
            for split in splits:
                got[f"{s.env}/{split}"] = evaluate_agent(sub("agent", f"{s.env}_{split}", split=split), lm)
        if "weights" in evals and model != base:
            got["weights"] = evaluate_weights(sub("weights", "weights", base=base), base_weights)
        lm.cache_clear()  # free this arm's model before the next one loads
        for ckpt in earlier_checkpoints(model) if s.checkpoints == "all" else []:
            lm = functools.cache(lambda ckpt=ckpt: eval_model(s, str(ckpt)))
            at = f"checkpoints/{ckpt.name}"
            if "wm" in evals:
                got[f"{at}/wm"] = evaluate_wm(sub("wm", f"{at}/wm", str(ckpt)), lm, reward)
            if "agent" in evals:
                for split in splits:
                    got[f"{at}/{s.env}/{split}"] = evaluate_agent(
                        sub("agent", f"{at}/{s.env}_{split}", str(ckpt), split=split), lm)
            lm.cache_clear()
        results[name] = got
    return results


def earlier_checkpoints(model: str) -> list[Path]:
    """The checkpoints (ckpt/step_*) a training run dir holds besides its newest, which is the model the run dir
    names (common.load_model); in step order. [] for anything else (a model name, a checkpoint dir)."""
    root = Path(model) / "ckpt"
    latest = latest_checkpoint(root)
    if latest is None:
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p != latest), key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


# ----------------------------------------------------------------------------------------------------------
# Report: runs side by side, training curves, weight change by layer

def parse_pairs(text: str, flag: str) -> list[tuple[str, Path]]:
    pairs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag}: expected name=path,... but got {item!r}")
        pairs.append((name, Path(path)))
    return pairs


def load_results(name: str, run_dir: Path) -> list[dict]:
    """Every results.json under run_dir but its checkpoints/ (load_checkpoints); two agent results for the same env
    split would be one row, so an error."""
    files = sorted(f for f in run_dir.rglob("results.json") if "checkpoints" not in f.relative_to(run_dir).parts)
    if not files:
        raise SystemExit(f"--runs: no results.json under {run_dir}")
    results, seen = [], {}
    for f in files:
        r = json.loads(f.read_text())
        if r["what"] == "agent":
            key = (r["env"], r["split"])
            if key in seen:
                raise SystemExit(f"--runs {name}: {seen[key]} and {f} both hold {' '.join(key)} agent results")
            seen[key] = f
        results.append(r)
    return results


def load_checkpoints(name: str, run_dir: Path) -> dict[int, list[dict]]:
    """{step: its results} of the earlier checkpoints --what arms --checkpoints all evaluated into
    run_dir/checkpoints/step_N/, in step order ({} when there are none)."""
    folders = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()), key=checkpoint_step)
    return {checkpoint_step(p): load_results(f"{name} {p.name}", p) for p in folders}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(row) + " |" for row in rows])


def report_tables(runs: dict[str, list[dict]]) -> str:
    """Markdown: agent success per env split (+ each env's pooled average, as the paper's AVG), invalid /
    inefficient action rates, world-model accuracy, weight change. A table appears when some run has its data."""
    parts = []
    agent = {name: {(r["env"], r["split"]): r for r in rs if r["what"] == "agent"} for name, rs in runs.items()}
    splits = sorted({key for by in agent.values() for key in by})
    if splits:
        envs = sorted({env for env, _ in splits if sum(e == env for e, _ in splits) > 1})
        header = ["run"] + [f"{e} {sp}" for e, sp in splits] + [f"{e} avg" for e in envs]
        rows = []
        for name, by in agent.items():
            cells = [f"{pct(r['success'])} [{pct(r['success_ci95'][0])}, {pct(r['success_ci95'][1])}] "
                     f"(n={r['n_episodes']})" if (r := by.get(key)) else "–" for key in splits]
            for env in envs:  # pooled over splits, so weighted by task count as the paper's AVG (137 ID + 78 OOD)
                rs = [r for (e, _), r in by.items() if e == env]
                n = sum(r["n_episodes"] for r in rs)
                cells.append(pct(sum(r["n_success"] for r in rs) / n) if n else "–")
            rows.append([name] + cells)
        parts.append("### Task success (%, 95% Wilson interval)\n\n" + md_table(header, rows))
        rows = [[name] + [f"{pct(r['invalid_rate'])} / {pct(r['inefficient_rate'])} / {r['mean_steps']:.1f}"
                          if (r := by.get(key)) else "–" for key in splits] for name, by in agent.items()]
        parts.append("### Invalid / inefficient actions (% of steps) / mean steps\n\n" +
                     md_table(["run"] + header[1:1 + len(splits)], rows))
        # per task type (ALFWorld's six, τ²'s domains as in the paper's Table 1), pooled over the env's splits
        types = sorted({(env, t) for by in agent.values() for (env, _), r in by.items() for t in r["by_task_type"]})
        rows = []
        for name, by in agent.items():
            cells = []
            for env, t in types:
                groups = [r["by_task_type"][t] for (e, _), r in by.items() if e == env and t in r["by_task_type"]]
                n = sum(g["n_episodes"] for g in groups)
                cells.append(f"{pct(sum(g['n_success'] for g in groups) / n)} (n={n})" if n else "–")
            rows.append([name] + cells)
        parts.append("### Task success by task type (%, all splits)\n\n" +
                     md_table(["run"] + [f"{env} {t}" for env, t in types], rows))
    wm = [(name, r) for name, rs in runs.items() for r in rs if r["what"] == "wm"]
    if wm:
        envs = sorted({k for _, r in wm for k in r["by_env"]})
        kinds = sorted({k for _, r in wm for k in r["by_next_kind"]})
        rows = [[name, Path(r["triples"]).name, str(r["n"]), pct(r["accuracy"])] +
                [pct(r["by_env"].get(k, {}).get("accuracy")) for k in envs] +
                [pct(r["by_next_kind"].get(k, {}).get("accuracy")) for k in kinds] + [pct(r["missing_rate"])]
                for name, r in wm]
        header = ["run", "triples", "n", "all"] + envs + [f"next_kind {k}" for k in kinds] + ["no `<next_state>`"]
        parts.append("### World-model accuracy (%, RWML reward)\n\n" + md_table(header, rows))
    weights = [(name, r) for name, rs in runs.items() for r in rs if r["what"] == "weights"]
    if weights:
        modules = [m for m in MODULES + ("other",) if any(m in r["by_module"] for _, r in weights)]
        rows = [[name, r["base"], f"{100 * r['overall']:.2f}"] +
                [f"{100 * r['by_module'][m]:.2f}" if m in r["by_module"] else "–" for m in modules]
                for name, r in weights]
        eta = ", ".join(sorted({str(r["eta"]) for _, r in weights}))
        parts.append(f"### Parameters changed vs. base (%, eta = {eta})\n\n" +
                     md_table(["run", "base", "all"] + modules, rows))
    return "\n\n".join(parts)


def metrics_rows(path: Path) -> list[dict]:
    path = path / "metrics.jsonl" if path.is_dir() else path
    return read_jsonl(path)


CURVES = (("reward_mean", "training reward"), ("val_acc", "held-out WM accuracy"),
          ("zero_var_frac", "zero-variance groups"), ("kl", "KL to the reference"), ("entropy", "token entropy"),
          ("resp_len", "response length, tokens"))  # what says whether GRPO learns (README, Diagnostics)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """One page, a panel per CURVES key with every run overlaid (x = "step" where logged, else the row number)."""
    import matplotlib.pyplot as plt

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not any(number(row.get(key)) for rows in curves.values() for row in rows for key, _ in CURVES):
        raise SystemExit(f"--curves: none of {', '.join(k for k, _ in CURVES)} logged in {', '.join(curves)}")
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for name, rows in curves.items():
            pts = [(row.get("step", i), row[key]) for i, row in enumerate(rows) if number(row.get(key))]
            if pts:
                ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 30 else None)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(f"{title} ({key})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_wm_vs_success(arms: dict[str, dict], path: Path) -> bool:
    """World-model accuracy (x) against task success (y), both in %: a point per arm that has both (summarize's
    numbers), with its 95% intervals as error bars both ways, and for an arm with evaluated earlier checkpoints a
    line through them in step order, ending at the arm. -> False (and no file) when no arm has both."""
    import matplotlib.pyplot as plt

    def xy(h: dict) -> tuple[float, float] | None:
        if h["wm_accuracy"] is None or h["success"] is None or not h["wm_accuracy"]["n"]:
            return None
        return tuple(100 * x["k"] / x["n"] for x in (h["wm_accuracy"], h["success"]))
    if not any(xy(arm) or any(xy(c) for c in arm["checkpoints"]) for arm in arms.values()):
        return False
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, (name, arm) in enumerate(arms.items()):
        color = f"C{i % 10}"
        line = [(c["step"], p) for c in arm["checkpoints"] if (p := xy(c))]
        if line:
            pts = [p for _, p in line] + ([xy(arm)] if xy(arm) else [])
            ax.plot(*zip(*pts), color=color, marker=".", linewidth=1, label=f"{name} (checkpoints)")
            for step, (x, y) in line:
                ax.annotate(f"step {step}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        if p := xy(arm):
            (wlo, whi), (slo, shi) = arm["wm_accuracy"]["ci95"], arm["success"]["ci95"]
            ax.errorbar(*p, xerr=[[p[0] - 100 * wlo], [100 * whi - p[0]]],
                        yerr=[[p[1] - 100 * slo], [100 * shi - p[1]]], color=color, marker="o", capsize=3, label=name)
    ax.set(xlabel="world-model accuracy, held-out triples (%)", ylabel="task success, agent splits pooled (%)",
           xlim=(-2, 102), ylim=(-2, 102), title="World-model accuracy vs task success (95% Wilson intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_weight_change(weights: dict[str, dict], path: Path) -> None:
    """Left: changed fraction per transformer layer, a line per run. Right: per module type, bars per run."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (by_layer, by_module) = plt.subplots(1, 2, figsize=(11, 3.5))
    modules = [m for m in MODULES + ("other",) if any(m in r["by_module"] for r in weights.values())]
    width = 0.8 / len(weights)
    for i, (name, r) in enumerate(weights.items()):
        by_layer.plot([int(k) for k in r["by_layer"]], [100 * v for v in r["by_layer"].values()], marker=".",
                      label=name)
        by_module.bar([j + i * width for j in range(len(modules))],
                      [100 * r["by_module"].get(m, 0.0) for m in modules], width, label=name)
    by_layer.set(xlabel="layer", ylabel="% parameters changed", title="by layer")
    by_layer.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_module.set(ylabel="% parameters changed", title="by module")
    by_module.set_xticks([j + 0.4 - width / 2 for j in range(len(modules))], modules, rotation=30, fontsize=8)
    by_layer.legend(fontsize=8)
    by_module.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stage_times(run_dir: Path) -> dict[str, float]:
    """{stage folder relative to run_dir: seconds} from every DONE file under run_dir (run.sh writes "<N> s" into
    it when the stage ends), in the order the stages finished."""
    times = {}
    for f in sorted(run_dir.rglob("DONE"), key=lambda f: f.stat().st_mtime):
        text = f.read_text().strip()
        if not (m := re.fullmatch(r"(\d+(?:\.\d+)?) s", text)):
            raise SystemExit(f"{f}: expected '<seconds> s' as run.sh writes it, got {text!r}")
        times[f.parent.relative_to(run_dir).as_posix()] = float(m[1])
    return times


def interval(k: int, n: int, ci95) -> dict:
    return {"k": k, "n": n, "ci95": list(ci95)}


def lm_eval_headline(x: dict) -> dict:
    """A task's n and its own metrics; a tag, which has none of its own, gives its subtasks' as "<subtask> <metric>"."""
    parts = {f"{part} {key}": m for part, ms in x["parts"].items() for key, m in ms.items()}
    return {"n": x["n"], "metrics": x["metrics"] or parts}


def headline(results: list[dict]) -> dict:
    """One model's headline numbers from its results: WM accuracy and agent success per env/split (k, n, 95% CI
    each), success pooled over its splits (the paper's AVG pools ID and OOD) and its invalid-action rate over all
    their steps; None / {} where not measured."""
    wm = next((r for r in results if r["what"] == "wm"), None)
    agent = [r for r in results if r["what"] == "agent"]
    k, n, steps = (sum(r[key] for r in agent) for key in ("n_success", "n_episodes", "n_steps"))
    return {"wm_accuracy": wm and interval(wm["k"], wm["n"], wm["ci95"]),
            "agent": {f"{r['env']}/{r['split']}": interval(r["n_success"], r["n_episodes"], r["success_ci95"])
                      for r in agent},
            "success": interval(k, n, wilson_interval(k, n)) if n else None,
            "invalid_rate": sum((r["invalid_rate"] or 0.0) * r["n_steps"] for r in agent) / steps if steps else None}


def summarize(runs: dict[str, list[dict]], start_arm: str,
              checkpoints: dict[str, dict[int, list[dict]]]) -> dict[str, dict]:
    """summary.json's runs: per arm its headline numbers (headline: WM accuracy, agent success per env/split and
    pooled, invalid-action rate), fraction of weights changed, forgetting (probe, lm-eval tasks), and its earlier
    checkpoints' headline numbers in step order ({"step", ...}; [] without --checkpoints all), null / {} where not
    measured. nll_delta is the arm's probe NLL minus the start arm's (> 0: the arm lost general ability). lm_eval:
    per task its n and metrics {"<metric>,<filter>": {"value", "stderr"}} (lm_eval_headline)."""
    start_nll = next((r["nll"] for r in runs.get(start_arm, []) if r["what"] == "forgetting"), None)
    summary = {}
    for name, results in runs.items():
        arm = {**headline(results), "weights_changed": None, "forgetting": None,
               "checkpoints": [{"step": step, **headline(rs)} for step, rs in checkpoints.get(name, {}).items()]}
        for r in results:
            if r["what"] == "weights":
                arm["weights_changed"] = r["overall"]
            elif r["what"] == "forgetting":
                arm["forgetting"] = {"nll": r["nll"], "nll_delta": None if start_nll is None else r["nll"] - start_nll,
                                     "n_tokens": r["n_tokens"], "contains": r["contains"],
                                     "lm_eval": {task: lm_eval_headline(x) for task, x in r.get("lm_eval", {}).items()}}
        summary[name] = arm
    return summary


def forgetting_table(runs: dict) -> str:
    """Markdown, paper Table 3's comparison: a row per benchmark metric (the probe's two, then every lm-eval task's),
    a column per arm; "" when no arm has a forgetting result."""
    arms = {name: arm["forgetting"] for name, arm in runs.items() if arm["forgetting"]}
    if not arms:
        return ""
    probe = "probe (--probe)"
    rows = [[probe, "NLL/token (lower is better)", "–"] + [f"{f['nll']:.3f}" for f in arms.values()],
            [probe, "greedy answers right", "–"] + [f"{f['contains']['k']}/{f['contains']['n']}"
                                                     for f in arms.values()]]
    tasks: dict[str, dict] = {}  # task -> its metric keys, in the order the arms list them
    for f in arms.values():
        for task, x in f["lm_eval"].items():
            tasks.setdefault(task, {}).update(dict.fromkeys(x["metrics"]))
    for task, keys in tasks.items():
        n = "/".join(sorted({str(f["lm_eval"][task]["n"]) for f in arms.values() if task in f["lm_eval"]}))
        for key in keys:
            cells = [f["lm_eval"].get(task, {}).get("metrics", {}).get(key) for f in arms.values()]
            rows.append([task, key, n] + [value_stderr(m) if m else "–" for m in cells])
    return ("### Forgetting (paper Table 3): general benchmarks, lm-eval's value ± stderr\n\n" +
            md_table(["benchmark", "metric", "n"] + list(arms), rows))


def summary_tables(summary: dict, start_arm: str) -> str:
    """Markdown: one row per arm with every headline number, then the stage times."""
    def ci(x) -> str:
        return "–" if x is None else f"{pct(x['k'] / x['n']) if x['n'] else '–'} [{pct(x['ci95'][0])}, " \
                                     f"{pct(x['ci95'][1])}] ({x['k']}/{x['n']})"
    splits = sorted({key for arm in summary["runs"].values() for key in arm["agent"]})
    pooled = len(splits) > 1   # the success the plot shows: every split pooled
    rows = []
    for name, arm in summary["runs"].items():
        f = arm["forgetting"]
        nll = "–" if f is None else f"{f['nll']:.3f}" + ("" if f["nll_delta"] is None or name == start_arm
                                                          else f" ({f['nll_delta']:+.3f})")
        changed = arm["weights_changed"]
        rows.append([name, ci(arm["wm_accuracy"])] + [ci(arm["agent"].get(key)) for key in splits] +
                    ([ci(arm["success"])] if pooled else []) +
                    [pct(arm["invalid_rate"]), "–" if changed is None else f"{100 * changed:.2f}", nll,
                     ci(f and f["contains"])])
    header = ["arm", "WM accuracy"] + [f"{key} success" for key in splits] + \
        (["success, all splits"] if pooled else []) + \
        ["invalid actions", "params changed", f"probe NLL/token (Δ vs {start_arm})", "probe answers right"]
    parts = ["### All arms (%, [95% Wilson interval], (k/n))\n\n" + md_table(header, rows)] if rows else []
    if table := forgetting_table(summary["runs"]):
        parts.append(table)
    if summary["stages"]:
        rows = [[name, f"{sec:.0f}"] for name, sec in summary["stages"].items()] + \
            [["**total**", f"{summary['wall_s']:.0f}"]]
        parts.append("### Stage times (s)\n\n" + md_table(["stage", "seconds"], rows))
    return "\n\n".join(parts)


def report(s: Settings) -> str:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    if not s.runs and not s.curves:
        raise SystemExit("--what report needs --runs name=eval_dir,... and/or --curves name=run_dir,...")
    out = Path(s.out_dir)
    save_config(s, out)
    pairs = parse_pairs(s.runs, "--runs")
    runs = {name: load_results(name, path) for name, path in pairs}
    checkpoints = {name: load_checkpoints(name, path) for name, path in pairs}
    stages = stage_times(Path(s.stages)) if s.stages else {}
    # wall_s: the stages run one after another, so their sum is the pipeline's wall time (without the report)
    summary = {"runs": summarize(runs, s.start_arm, checkpoints), "stages": stages, "wall_s": sum(stages.values())}
    write_json(out / "summary.json", summary)
    parts = ["# RWML evaluation report", summary_tables(summary, s.start_arm)]
    if plot_wm_vs_success(summary["runs"], out / "wm_vs_success.png"):
        parts.append("### World-model accuracy vs task success\n\nEach arm with both numbers, with its 95% Wilson "
                     "intervals both ways (success: every agent split pooled); a line runs through the earlier "
                     "checkpoints of an arm evaluated with `--checkpoints all`, labelled by step, to the arm itself."
                     "\n\n![world-model accuracy vs task success](wm_vs_success.png)")
    if s.curves:
        plot_curves({name: metrics_rows(path) for name, path in parse_pairs(s.curves, "--curves")},
                    out / "curves.png")
        parts.append("### Training curves\n\n![training curves](curves.png)")
    if runs:
        parts.append("## Details\n\n" + report_tables(runs))
        weights = {name: r for name, rs in runs.items() for r in rs if r["what"] == "weights"}
        if weights:
            plot_weight_change(weights, out / "weight_change.png")
            parts.append("![weight change by layer and module](weight_change.png)")
    text = "\n\n".join(parts) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    return text


DEFAULT_TEMPERATURE = {"agent": 1.0, "wm": 0.0}  # --temperature none: agent samples 3 runs (Table 1), wm is greedy


def main(argv: list[str] | None = None):
    s = parse_settings(Settings, argv)
    if s.temperature is None:
        s.temperature = DEFAULT_TEMPERATURE.get(s.what, 0.0)
    seed_everything(s.seed)
    return {"agent": evaluate_agent, "wm": evaluate_wm, "weights": evaluate_weights, "forgetting": evaluate_forgetting,
            "arms": evaluate_arms, "report": report}[s.what](s)


if __name__ == "__main__":
    main()
