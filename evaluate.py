"""Evaluate checkpoints the way the paper does (RWML §4), one --what at a time:

  agent    play an env split with the model as the agent (30 steps; 3 sampled episodes per task at temperature 1.0,
           as Table 1 averages 3 runs; --greedy: one greedy episode): success rate with a 95% Wilson interval,
           its mean ± std over the rollouts, mean steps, invalid and inefficient action rates, overall and per
           task type. Resumable: episodes.jsonl grows one finished episode at a time, a rerun plays the rest.
  wm       world-model accuracy on held-out triples (triples_val.jsonl) under the RWML reward, by env and next_kind.
  weights  the fraction of parameters a checkpoint changed against its base model (paper §4.2), per transformer
           layer and per module type.
  report   markdown tables comparing runs side by side, and PNG plots of training curves and weight change.

agent / wm / weights write out_dir/results.json (+ config.json); report reads every results.json under each run dir.

  python evaluate.py --what agent --model runs/rwml/ckpt/step_000100 --env alfworld --split valid_seen \
      --out-dir runs/eval/rwml/alfworld_valid_seen
  python evaluate.py --what wm --model runs/rwml/ckpt/step_000100 --triples runs/collect/triples_val.jsonl \
      --out-dir runs/eval/rwml/wm
  python evaluate.py --what weights --model runs/rwml/ckpt/step_000100 --base smollm2-135m --out-dir runs/eval/rwml/weights
  python evaluate.py --what report --runs base=runs/eval/base,rwml=runs/eval/rwml --curves rwml=runs/rwml \
      --out-dir runs/report
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import (append_jsonl, chat_ids, check_resume, generate, load_model, parse_settings, pick_tasks, read_jsonl,
                    read_jsonl_resumable, save_config, seed_everything, write_jsonl)


@dataclass
class Settings:
    """Evaluate a checkpoint (agent success, world-model accuracy, weight change) or write a report."""
    what: str = field(default="agent", metadata={"choices": ["agent", "wm", "weights", "report"],
                                                 "help": "what to evaluate"})
    model: str = field(default="smollm2-135m", metadata={"help": "tiny | smollm2-135m | HF id | checkpoint dir"})
    out_dir: str = "runs/eval"
    seed: int = 0
    # agent
    env: str = field(default="alfworld", metadata={"choices": ["alfworld", "twx", "tau2"]})
    split: str = field(default="valid_seen", metadata={"help": "alfworld: train | valid_seen (ID) | valid_unseen (OOD)"})
    n_tasks: int | None = field(default=None, metadata={"help": "a seeded sample of this many tasks (none = all)"})
    rollouts: int = field(default=3, metadata={"help": "episodes per task (paper: Table 1 is the mean of 3 runs)"})
    greedy: bool = field(default=False, metadata={"help": "one greedy episode per task (sets --temperature 0 "
                                                          "--rollouts 1)"})
    max_steps: int = field(default=30, metadata={"help": "paper: 30 at evaluation"})
    history: int = field(default=2, metadata={"help": "past turns in the agent prompt (paper: 2 ALFWorld, 5 τ²)"})
    n_workers: int = field(default=0, metadata={"help": "env worker processes (0 = in this process)"})
    task_type: str | None = field(default=None, metadata={"help": "only tasks of this type (alfworld: e.g. "
                                                                  "pick_and_place_simple; twx: a game; tau2: a "
                                                                  "domain, airline | retail | telecom)"})
    user_model: str = field(default="smollm2-135m", metadata={"help": "τ² user simulator: a local model (tiny | "
                                                                      "smollm2-135m | HF id | path) or "
                                                                      "litellm:<name> (paper's official eval: "
                                                                      "litellm:gpt-4.1)"})
    # generation (agent and wm)
    temperature: float | None = field(default=None, metadata={"help": "0 = greedy; none = 1.0 for agent (the paper "
                                                                       "samples at 1.0 in collection and RL; it does "
                                                                       "not state eval's), greedy for wm"})
    top_p: float = 1.0
    max_new_tokens: int = field(default=512, metadata={"help": "response length cap (paper: 512)"})
    batch_size: int = 16
    # wm
    triples: str = field(default="", metadata={"help": "held-out triples JSONL (collect.py's triples_val.jsonl)"})
    n_triples: int | None = field(default=None, metadata={"help": "the first N triples (none = all)"})
    wm_prompt: str = field(default="rwml", metadata={"choices": ["rwml", "sft"], "help": "the prompt the checkpoint "
                                                     "was trained with: rwml = reason then predict; sft = the WM SFT "
                                                     "prompt (filter.py --sft-prompt paper)"})
    embedder: str = field(default="minilm", metadata={"help": "minilm | sentence-transformers id (paper: "
                                                              "Qwen/Qwen3-Embedding-8B)"})
    embed_instruction: str = field(default="auto", metadata={"help": "truth-side instruction: auto (if an "
                                                                      "instruct embedder) | none | text"})
    tau_d: float = field(default=0.2, metadata={"help": "RWML threshold for observations (paper: 0.2 ALFWorld)"})
    tau_d_user: float = field(default=0.4, metadata={"help": "RWML threshold for τ² user replies (paper: 0.4)"})
    max_state_tokens: int = field(default=100, metadata={"help": "truncate predictions before scoring (100 ALFWorld, "
                                                                 "512 τ²)"})
    # weights
    base: str = field(default="", metadata={"help": "base model the checkpoint started from: a dir (streamed, "
                                                    "e.g. a 7B's local snapshot) or a name (loaded on CPU)"})
    eta: float = field(default=1e-3, metadata={"help": "relative change threshold (paper §4.2: 1e-3)"})
    # report
    runs: str = field(default="", metadata={"help": "name=eval_dir,... : table rows, each from the results.json "
                                                    "files under eval_dir"})
    curves: str = field(default="", metadata={"help": "name=run_dir_or_metrics.jsonl,... : training curves to plot"})


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


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


def evaluate_agent(s: Settings) -> dict:
    from tqdm import tqdm

    from rollout import make_suite, model_actor, run_episodes, strip_samples

    if s.greedy:   # resolved before config.json and the resume check, so both see what was run
        s.temperature, s.rollouts = 0.0, 1
    if s.n_tasks is not None and s.n_tasks < 1 or s.rollouts < 1:
        raise SystemExit(f"--n-tasks ({s.n_tasks}) and --rollouts ({s.rollouts}) must be at least 1")
    out = Path(s.out_dir)
    check_resume(s, out, ("model", "env", "split", "max_steps", "history", "temperature", "top_p",
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
        model, tok = load_model(s.model)
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed)
        act = model_actor(model, tok, s.temperature, s.max_new_tokens, s.top_p, generator=gen)
        bar = tqdm(total=len(todo), desc=f"eval {s.env}/{s.split}", dynamic_ncols=True)

        def save(episode: dict) -> None:  # one fsynced line per finished episode: a kill loses only the live ones
            episode = strip_samples(episode)
            append_jsonl(path, [episode])
            done[(episode["task_id"], episode["rollout"])] = episode
            bar.update(1)

        try:
            run_episodes(act, suite, todo, env=s.env, split=s.split, model=s.model, max_steps=s.max_steps,
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

TRIPLE_KEYS = ("id", "env", "instruction", "history", "state", "action", "next_state", "next_kind")


def wm_stats(rows: list[dict]) -> dict:
    """accuracy = mean reward (binary for observations and user replies; snapped ROUGE-L for τ² tool replies)."""
    n = len(rows)
    return {"n": n, "accuracy": sum(r["reward"] for r in rows) / n if n else None,
            "missing_rate": sum(r["prediction"] == "none" for r in rows) / n if n else None}


def wm_results(rows: list[dict]) -> dict:
    def by(key: str) -> dict:
        return {k: wm_stats([r for r in rows if r[key] == k]) for k in sorted({r[key] for r in rows})}
    return {**wm_stats(rows), "by_env": by("env"), "by_next_kind": by("next_kind")}


def evaluate_wm(s: Settings) -> dict:
    from prompts import extract_next_state, wm_messages
    from rewards import WorldModelReward

    if not s.triples:
        raise SystemExit("--what wm needs --triples (a triples JSONL, e.g. collect.py's triples_val.jsonl)")
    out = Path(s.out_dir)
    save_config(s, out)
    triples = read_jsonl(s.triples, required=TRIPLE_KEYS)
    triples = triples[:s.n_triples]
    model, tok = load_model(s.model)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed)
    samples = generate(model, tok, [chat_ids(tok, wm_messages(t, s.wm_prompt)) for t in triples], s.max_new_tokens,
                       s.temperature, s.top_p, s.batch_size, generator=gen, progress=True)
    del model  # the embedder needs the memory more now
    reward = WorldModelReward(s.embedder, s.tau_d, s.max_state_tokens, tau_d_user=s.tau_d_user,
                              embed_instruction=s.embed_instruction)
    scores = reward([x.text for x in samples], triples).tolist()
    rows = [{"id": t["id"], "env": t["env"], "next_kind": t["next_kind"], "reward": r,
             "prediction": extract_next_state(x.text), "next_state": t["next_state"], "response": x.text,
             "finished": x.finished} for t, x, r in zip(triples, samples, scores)]
    write_jsonl(out / "predictions.jsonl", rows)
    results = {"what": "wm", "model": s.model, "triples": s.triples, "wm_prompt": s.wm_prompt, "embedder": s.embedder,
               "tau_d": s.tau_d,
               "tau_d_user": s.tau_d_user, **wm_results(rows)}
    write_json(out / "results.json", results)
    print(f"world-model accuracy {results['accuracy']:.3f} on {len(rows)} triples "
          f"(missing <next_state>: {results['missing_rate']:.3f}) -> {out}")
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
    """A dir with safetensors is streamed tensor by tensor; a name (tiny, smollm2-135m, a HF id) is loaded whole
    on CPU in fp32, so give a large base model as its local snapshot dir."""
    path = Path(name).expanduser()
    if path.is_dir() and any(path.glob("*.safetensors")):
        return SafetensorsDir(path)
    return load_model(name, dtype=torch.float32, device="cpu")[0].state_dict()


def evaluate_weights(s: Settings) -> dict:
    if not s.base:
        raise SystemExit("--what weights needs --base (the model the checkpoint was trained from)")
    out = Path(s.out_dir)
    save_config(s, out)
    results = {"what": "weights", "model": s.model, "base": s.base,
               **weight_change(model_weights(s.base), model_weights(s.model), s.eta)}
    write_json(out / "results.json", results)
    print(f"changed {results['overall']:.4f} of {results['n_params']:,} parameters (eta {s.eta}) -> {out}")
    return results


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
    """Every results.json under run_dir; two agent results for the same env split would be one row, so an error."""
    files = sorted(run_dir.rglob("results.json"))
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


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """One panel per numeric metric key found in any run (x = "step" where logged, else the row number)."""
    import matplotlib.pyplot as plt

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    keys = sorted({k for rows in curves.values() for row in rows for k, v in row.items()
                   if number(v) and k not in ("step", "time")})
    if not keys:
        raise SystemExit(f"--curves: no numeric metrics in {', '.join(curves)}")
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in curves.items():
            pts = [(row.get("step", i), row[key]) for i, row in enumerate(rows) if number(row.get(key))]
            if pts:
                ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def report(s: Settings) -> str:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    if not s.runs and not s.curves:
        raise SystemExit("--what report needs --runs name=eval_dir,... and/or --curves name=run_dir,...")
    out = Path(s.out_dir)
    save_config(s, out)
    runs = {name: load_results(name, path) for name, path in parse_pairs(s.runs, "--runs")}
    parts = ["# RWML evaluation report"]
    if runs:
        parts.append(report_tables(runs))
        weights = {name: r for name, rs in runs.items() for r in rs if r["what"] == "weights"}
        if weights:
            plot_weight_change(weights, out / "weight_change.png")
            parts.append("![weight change by layer and module](weight_change.png)")
    if s.curves:
        plot_curves({name: metrics_rows(path) for name, path in parse_pairs(s.curves, "--curves")},
                    out / "curves.png")
        parts.append("### Training curves\n\n![training curves](curves.png)")
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
    return {"agent": evaluate_agent, "wm": evaluate_wm, "weights": evaluate_weights, "report": report}[s.what](s)


if __name__ == "__main__":
    main()
