"""GRPO for the world model (RWML, paper §2.2) and for the policy (task-success RL), in one flat script.

  python train_rwml.py --task wm --data runs/filter/filtered.jsonl --val-data runs/collect/triples_val.jsonl \
      --model smollm2-135m --out-dir runs/rwml
  python train_rwml.py --task policy --env alfworld --model runs/rwml/ckpt/step_000100 --max-steps 300 --out-dir runs/policy
  torchrun --nproc_per_node 8 train_rwml.py ...     # FSDP2; each rank owns a contiguous shard of the step's groups

One step: G responses per prompt (wm) or G episodes per task (policy) from the generation model -> rewards ->
group advantages -> `ppo_epochs` optimizer steps of the clipped GRPO loss on the exact sampled token ids (prompt ids
+ response ids as sampled, never re-tokenized text; the loss mask covers the model's own tokens only).

Shared prompts (--share-prompt, default): the G responses to one prompt train in one tree row that holds the prompt
once (common.pack_shared: each response attends to the prompt and to itself, at its own positions), so the policy,
reference, old-log-prob and entropy passes compute and backpropagate each prompt once per group, with the same
numbers as --no-share-prompt (one prompt copy per response; tests/test_share.py). Policy steps share only exact
duplicate prompts (a task's first steps); partly shared prompts stay rows of their own.

old log-probs: the trainer's own log-probs under the pre-update weights, taken from the first epoch's forward pass
(an epoch is one optimizer step with gradient accumulation, so that pass runs before any update); later epochs
reuse them. The sampler's log-probs are used only by the agreement check and the --tis-cap weight.

Outputs in out_dir: config.json, metrics.jsonl (a row per step), ckpt/step_N (HF model + trainer state; the last
one is the trained model; with LoRA the model is the merged one and the adapters lie beside it for --resume).

Precision (--precision): one recipe for one process and for FSDP2: fp32 master weights, gradients and optimizer
state; forward/backward on bf16 copies of the weights (bf16); generation and the reference model in bf16.
Diagnostics (issue 12) run every step; alarms go to the console and to the "alarms" key of metrics.jsonl.
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import prompts
import rollout
from kernels import group_advantages, grpo_loss



@dataclass
class Settings:
    """GRPO: RWML world-model training (--task wm) or policy RL on task success (--task policy)."""
    task: str = common.flag("wm", "wm: predict next states (RWML); policy: act in --env for task success", ["wm", "policy"])
    model: str = common.flag("smollm2-135m", "start: tiny | smollm2-135m | HF id | checkpoint dir (base, WM SFT, RWML)")
    out_dir: str = common.flag("runs/rwml", "config.json, metrics.jsonl, ckpt/")
    seed: int = common.flag(0, "data order and sampling")
    resume: bool = common.flag(False, "continue from out_dir/ckpt/latest (same settings)")
    # --task wm data
    data: str = common.flag("runs/filter/filtered.jsonl", "training triples JSONL (rows with kept=false are skipped)")
    val_data: str = common.flag("", "held-out triples: accuracy every --val-every steps ('' = none)")
    val_every: int = common.flag(10, "steps between held-out evaluations (and one at the end)")
    val_size: int = common.flag(256, "held-out triples evaluated: a seeded sample (0 = all)")
    val_temperature: float = common.flag(0.0, "held-out sampling temperature (0 = greedy)")
    max_prompt_tokens: int = common.flag(1500, "longer prompts are skipped when the data loads (counted), never truncated")
    # --task policy
    env: str = common.flag("alfworld", "policy env", ["alfworld", "twx", "tau2"])
    split: str = common.flag("train", "env split the policy trains on")
    task_type: str | None = common.flag(None, "only tasks of this type (alfworld: e.g. pick_and_place_simple; twx: a "
                                        "game, e.g. coin; tau2: a domain)")
    max_env_steps: int = common.flag(15, "steps per training episode (paper: 15)")
    history: int = common.flag(2, "past turns in the text-game agent prompt (paper: 2; a τ² agent sees the whole "
                               "conversation)")
    win_reward: float = common.flag(10.0, "reward of the last step of a won episode (paper, verl-agent: 10)")
    step_penalty: float = common.flag(0.1, "penalty on a step whose reply breaks the format (paper, verl-agent: 0.1)")
    penalize: str = common.flag("format", "which steps --step-penalty hits: format = reply without <think>/<action> "
                                "(paper; τ²: a malformed tool call or an empty reply); invalid = action not "
                                "admissible/accepted (ablation)", ["format", "invalid"])
    env_workers: int = common.flag(0, "env worker processes (0 = in this process)")
    user_model: str = common.flag("", "τ² user simulator: a local model (run here, greedy; '' = smollm2-135m) or "
                               "litellm:<name> for a hosted one, e.g. litellm:gpt-4.1")
    # sampling
    prompts_per_step: int | None = common.flag(None, "prompts (wm) / tasks (policy) per step over all ranks; "
                                              "none = paper: 32 wm, 8 policy")
    group_size: int = common.flag(8, "G responses (wm) or episodes (policy) per prompt (paper: 8)")
    temperature: float = common.flag(1.0, "sampling temperature; the trainer scores at the same one (paper: 1.0)")
    top_p: float = common.flag(1.0, "nucleus sampling; < 1 makes sampler and trainer log-probs differ (use --tis-cap)")
    max_new_tokens: int = common.flag(512, "response cap per sample / per env step (paper: 512)")
    gen_chunk: int = common.flag(4, "prompts per generate call, seeded by (seed, step, first prompt): any world size "
                             "whose per-rank prompt count it divides samples exactly the same")
    # optimisation
    epochs: float = common.flag(2.0, "passes over the triples (wm) or tasks (policy); --max-steps overrides")
    max_steps: int = common.flag(0, "training steps (0 = from --epochs)")
    lr: float = common.flag(1e-6, "AdamW learning rate (paper: 1e-6)")
    lr_schedule: str = common.flag("constant", "after warmup", ["constant", "cosine"])
    warmup_steps: int = common.flag(0, "linear warmup, in optimizer steps")
    weight_decay: float = common.flag(0.01, "AdamW weight decay (verl's default)")
    grad_clip: float = common.flag(1.0, "max global grad norm (0 = off)")
    ppo_epochs: int = common.flag(1, "optimizer steps on each batch (> 1: the clip and old log-probs matter)")
    micro_batch: int = common.flag(8, "sequences per forward/backward (gradients accumulate over the whole batch)")
    share_prompt: bool = common.flag(True, "compute each prompt once for all its sampled responses (tree rows, "
                                           "common.pack_shared); --no-share-prompt: one prompt copy per response")
    optim: str = common.flag("adamw", "adamw8bit = bitsandbytes AdamW8bit", ["adamw", "adamw8bit"])
    precision: str | None = common.flag(None, "fp32 | bf16: compute (forward/backward, generation, reference) in "
                                        "bf16 over fp32 master weights; none = bf16 on CUDA, fp32 on CPU",
                                        ["fp32", "bf16"])
    grad_checkpointing: bool = common.flag(False, "recompute decoder activations in backward")
    lora_rank: int = common.flag(0, "LoRA rank via peft on all linear layers (0 = full fine-tuning)")
    lora_alpha: int = common.flag(32, "LoRA alpha")
    # loss
    agg: str = common.flag("token-mean", "loss aggregation over the global batch (paper: token-mean)",
                    ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    clip_low: float = common.flag(0.2, "ratio clip below 1 (paper: 0.2)")
    clip_high: float = common.flag(0.2, "ratio clip above 1 (paper: 0.2; DAPO: 0.28)")
    beta: float | None = common.flag(None, "KL weight to the frozen start model; none = paper: 0.001 wm, 0.01 policy; "
                                    "0 = no reference model")
    kl: str = common.flag("k3", "KL estimator in the loss: k3 = verl's low_var_kl, k2 = half squared log-ratio, "
                   "k1 = log-ratio, whose expected gradient is zero (E_pi[grad log pi] = 0): k1 acts as --beta 0 plus "
                   "noise and only its logged kl means anything", ["k1", "k2", "k3"])
    adv_scale: str = common.flag("std", "advantage = (r - group mean) / group std, or r - group mean", ["std", "none"])
    entropy_coef: float | None = common.flag(None, "entropy bonus; none = paper: 0 wm, 0.001 policy")
    # reward (--task wm)
    embedder: str = common.flag("minilm", "reward embedder: minilm | sentence-transformers id (paper: Qwen3-Embedding-8B)")
    embed_instruction: str = common.flag("auto", "truth-side instruction: auto (if an instruct embedder) | none | text")
    tau_d: float = common.flag(0.2, "reward 1 if 1 - cos < tau_d (paper: 0.2 ALFWorld)")
    tau_d_user: float = common.flag(0.4, "tau_d for τ² user replies (paper: 0.4)")
    reward_max_tokens: int = common.flag(100, "predictions truncated before scoring (paper: 100 ALFWorld, 512 τ²)")
    reward_mode: str = common.flag("binary", "binary (paper) | score (raw cosine) | judge-binary / judge-score "
                                   "(Table 4's LLM-judge ablations: yes/no, or a 0-10 score / 10)",
                                   ["binary", "score", "judge-binary", "judge-score"])
    judge_model: str = common.flag("", "the judge of --reward-mode judge-*: a local model (tiny | smollm2-135m | HF id "
                                   "| path) or litellm:<name>")
    # diagnostics (issue 12; README "Diagnostics")
    tis_cap: float = common.flag(0.0, "truncated importance sampling: weight each token by min(pi_train/pi_rollout, C) "
                               "(0 = off)")
    zero_var_std: float = common.flag(0.01, "a group whose reward std is below this carries no signal (zero-variance)")
    drop_zero_var: bool = common.flag(False, "drop zero-variance groups from the batch (DAPO dynamic sampling)")
    agree_tol: float = common.flag(0.02, "alarm when mean |logp_rollout - logp_train| exceeds this")
    alarm_warmup: int = common.flag(3, "steps averaged as the start values the alarms compare with")
    length_alarm: float = common.flag(3.0, "alarm when mean response length exceeds this multiple of its start")
    rate_alarm: float = common.flag(0.25, "alarm when format-error / invalid-action rate rises this far above its start")
    entropy_alarm: float = common.flag(0.1, "alarm when entropy falls below this fraction of its start")
    zero_var_alarm: float = common.flag(0.9, "alarm when at least this fraction of groups is zero-variance")
    generic_alarm: float = common.flag(0.3, "alarm when the most common prediction's share exceeds the most common "
                                     "truth's by this much (generic world-model predictions, paper §3.4)")
    max_nonfinite: int = common.flag(5, "stop after this many non-finite steps in a row (each one is skipped)")
    # checkpoints
    save_every: int = common.flag(50, "steps between checkpoints (and one at the end)")


PAPER_DEFAULTS = {"wm": {"prompts_per_step": 32, "beta": 0.001, "entropy_coef": 0.0},
                  "policy": {"prompts_per_step": 8, "beta": 0.01, "entropy_coef": 0.001}}
TRIPLE_KEYS = ("id", "env", "instruction", "history", "state", "action", "next_state", "next_kind")
# settings that define the run (its data, samples, objective or optimizer): --resume refuses to continue under
# others (exact continuation)
SAME_ON_RESUME = ("task", "model", "data", "max_prompt_tokens", "env", "split", "task_type", "max_env_steps", "history",
                  "win_reward", "step_penalty", "penalize", "user_model", "seed", "prompts_per_step", "group_size",
                  "temperature", "top_p", "max_new_tokens", "gen_chunk", "epochs", "max_steps", "lr", "lr_schedule",
                  "warmup_steps", "weight_decay", "grad_clip", "ppo_epochs", "optim", "precision", "lora_rank",
                  "lora_alpha", "agg", "clip_low", "clip_high", "beta", "kl", "adv_scale", "entropy_coef", "embedder",
                  "embed_instruction", "tau_d", "tau_d_user", "reward_max_tokens", "reward_mode", "judge_model",
                  "tis_cap", "zero_var_std", "drop_zero_var")
LOGP_TOL = 1e-3  # a log-prob above this is a bug (wrong normalisation or gather), not rounding


# ----------------------------------------------------------------------------------------------------------
# Data: a seeded endless stream over the triples (wm) or task ids (policy); step k reads positions k*P..(k+1)*P-1

@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)  # str seeds hash stably across runs
    return tuple(order)


def stream(n: int, seed: int, start: int, count: int) -> list[int]:
    return [epoch_order(n, seed, pos // n)[pos % n] for pos in range(start, start + count)]


def load_wm_data(path: str, tokenizer, max_prompt_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """Kept triples and their world-model prompt ids; prompts over max_prompt_tokens are skipped (a truncated
    chat prompt loses the task and the intro), and the count is printed."""
    rows = [r for r in common.read_jsonl(path, TRIPLE_KEYS) if r.get("kept", True)]
    kept, ids = [], []
    for row in rows:
        p = common.chat_ids(tokenizer, prompts.wm_messages(row))
        if len(p) <= max_prompt_tokens:
            kept.append(row)
            ids.append(p)
    if len(kept) < len(rows):
        common.print0(f"{path}: skipped {len(rows) - len(kept)} of {len(rows)} triples whose prompt is longer than "
                      f"--max-prompt-tokens {max_prompt_tokens}")
    if not kept:
        raise SystemExit(f"{path}: no usable triples (kept, prompt <= {max_prompt_tokens} tokens)")
    return kept, ids


# ----------------------------------------------------------------------------------------------------------
# Sampling

def generator_for(device, *key: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]))
    return g


def sample_groups(gen_lm, tokenizer, prompt_ids: list[list[int]], keys: list[int], s: Settings, step: int,
                  n: int, temperature: float, chunk_prompts: int) -> list[common.Sample]:
    """n samples per prompt, prompt-major. One generate call per chunk_prompts prompts with a generator keyed by
    (seed, step, the chunk's first stream position), so the samples do not depend on how prompts were sharded."""
    device = next(gen_lm.parameters()).device
    out = []
    for c in range(0, len(prompt_ids), chunk_prompts):
        chunk = [p for p in prompt_ids[c:c + chunk_prompts] for _ in range(n)]
        out += common.generate(gen_lm, tokenizer, chunk, s.max_new_tokens, temperature, s.top_p,
                               batch_size=len(chunk), generator=generator_for(device, s.seed, step, keys[c]))
    return out


# ----------------------------------------------------------------------------------------------------------
# Model setup: the trained model (FSDP2 under torchrun), a generation copy, a frozen reference


def make_optimizer(s: Settings, params, total_updates: int):
    params = [p for p in params if p.requires_grad]
    if s.optim == "adamw8bit":
        try:
            import bitsandbytes as bnb
            opt = bnb.optim.AdamW8bit(params, lr=s.lr, weight_decay=s.weight_decay)
        except (ImportError, RuntimeError) as e:
            raise SystemExit(f"--optim adamw8bit: bitsandbytes cannot run here ({e}); use --optim adamw") from None
    else:
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    def factor(update: int) -> float:
        if update < s.warmup_steps:
            return (update + 1) / s.warmup_steps
        if s.lr_schedule == "constant":
            return 1.0
        progress = (update - s.warmup_steps) / max(1, total_updates - s.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------------------------------------
# Loss pieces the kernel does not cover (entropy bonus, k1/k2 KL), normalised like the kernel's aggregation but
# over the GLOBAL batch, so gradient accumulation and any world size give the same loss.

def kl_terms(logp, ref_logp, kind: str):
    """Per-token KL(pi || ref) estimates from samples of pi (Schulman 2020); k3 lives in the fused loss kernel.
    As loss terms on fixed samples, k1's gradient is grad log pi, zero in expectation: it estimates the KL but
    does not pull towards ref; k2's gradient (log pi - log ref) grad log pi is the true grad KL(pi || ref)."""
    log_ratio = logp - ref_logp
    return log_ratio if kind == "k1" else 0.5 * log_ratio.square()


def aggregate(x, mask, agg: str, n_tok: int, n_seq: int, t_norm: int):
    """Sum over this micro-batch of the global aggregation of per-token x [B, L] (mask bool [B, L])."""
    m = mask.to(x.dtype)
    if agg == "token-mean":
        return (x * m).sum() / n_tok
    if agg == "seq-mean-token-mean":
        return ((x * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seq
    return (x * m).sum() / (n_seq * t_norm)


def kernel_scale(mask, agg: str, n_tok: int, n_seq: int, t_norm: int) -> float:
    """grpo_loss normalises over its own micro-batch; this factor rescales that to the global batch. For
    seq-mean-token-sum-norm the divisor T is max_new_tokens (Dr. GRPO's constant budget), not the padded width."""
    b, width = mask.shape
    if agg == "token-mean":
        return float(mask.sum()) / n_tok
    if agg == "seq-mean-token-mean":
        return b / n_seq
    return b * width / (n_seq * t_norm)


# ----------------------------------------------------------------------------------------------------------
# Diagnostics (issue 12): pure functions on one step's numbers

def zero_variance_groups(rewards: torch.Tensor, group_size: int, min_std: float) -> torch.Tensor:
    """[n_groups] bool: groups whose reward std (unbiased, as the advantage uses) is below min_std. A threshold,
    not == 0, so near-constant continuous rewards (snapped ROUGE, raw cosine) count too."""
    r = rewards.reshape(-1, group_size).double()
    std = r.std(1) if group_size > 1 else torch.zeros(r.shape[0], dtype=r.dtype)
    return ~(std >= min_std)  # nan std (nan reward) counts as no signal


def tis_weights(old_logp, rollout_logp, mask, cap: float):
    """Truncated importance weight per token: min(pi_train / pi_rollout, cap), detached; 0 off the mask."""
    w = torch.exp((old_logp - rollout_logp).clamp(max=math.log(cap))).clamp(max=cap)
    return torch.where(mask, w, torch.zeros_like(w)).detach()


def normalize_state(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def near_identical(texts: list[str], min_ratio: float = 0.9) -> bool:
    """All of a group's normalised predictions within min_ratio similarity (difflib, on words) of the first."""
    words = [t.split() for t in texts]
    return all(difflib.SequenceMatcher(None, words[0], w).ratio() >= min_ratio for w in words[1:])


def top_share(texts: list[str]) -> float:
    return Counter(texts).most_common(1)[0][1] / len(texts) if texts else 0.0


def wm_hacking_monitor(predictions: list[str], truths: list[str], group_size: int) -> dict:
    """Paper §3.4: a world model can win an embedding reward with generic predictions. predictions are the
    extracted next states (G consecutive per prompt), truths one per prompt. Missing predictions ("none")
    are format errors, not hacking, and are left out."""
    preds = [normalize_state(p) for p in predictions]
    groups = [preds[i:i + group_size] for i in range(0, len(preds), group_size)]
    formatted = [p for p in preds if p != "none"]
    true_norm = [normalize_state(t) for t in truths]
    return {
        "wm_identical_groups": sum("none" not in g and near_identical(g) for g in groups) / max(1, len(groups)),
        "wm_top_pred_share": top_share(formatted),   # one prediction for every prompt: generic
        "wm_top_true_share": top_share(true_norm),   # what the data itself would give
        "wm_pred_words": float(np.mean([len(p.split()) for p in formatted])) if formatted else 0.0,
        "wm_true_words": float(np.mean([len(t.split()) for t in true_norm])) if true_norm else 0.0,
    }


def check_alarms(row: dict, start: dict, s: Settings) -> list[str]:
    """Alarms for one step's metrics row; `start` holds the mean of the first alarm_warmup steps (empty before)."""
    alarms = [f"non-finite {k}" for k in ("loss", "grad_norm", "reward_mean", "kl", "entropy")
              if isinstance(row.get(k), float) and not math.isfinite(row[k])]
    if row.get("agree_mean", 0.0) > s.agree_tol:
        alarms.append(f"rollout/trainer log-prob mismatch: mean |diff| {row['agree_mean']:.4f} > {s.agree_tol} "
                      f"(max {row['agree_max']:.3f}); check temperature/top-p/precision, or use --tis-cap")
    if row.get("zero_var_frac", 0.0) >= s.zero_var_alarm:
        alarms.append(f"{row['zero_var_frac']:.0%} of groups have zero reward variance: almost no learning signal")
    if row.get("wm_top_pred_share", 0.0) - row.get("wm_top_true_share", 0.0) > s.generic_alarm:
        alarms.append(f"generic world-model predictions: {row['wm_top_pred_share']:.0%} of predictions are the same "
                      f"text (truths: {row['wm_top_true_share']:.0%})")
    if not start:
        return alarms
    if start["resp_len"] > 0 and row["resp_len"] > s.length_alarm * start["resp_len"]:
        alarms.append(f"response length {row['resp_len']:.0f} > {s.length_alarm}x its start {start['resp_len']:.0f}")
    for key, what in (("format_error_rate", "format-error rate"), ("invalid_rate", "invalid-action rate")):
        if key in row and row[key] > start[key] + s.rate_alarm:
            alarms.append(f"{what} {row[key]:.2f} rose past its start {start[key]:.2f} + {s.rate_alarm}")
    if math.isfinite(row.get("entropy", math.nan)) and row["entropy"] < s.entropy_alarm * start["entropy"]:
        alarms.append(f"entropy collapse: {row['entropy']:.4f} < {s.entropy_alarm} x start {start['entropy']:.4f}")
    return alarms


def rollout_metrics(every: dict, s: Settings) -> dict:
    """One step's rollout numbers from the lists gathered over ranks (group members consecutive)."""
    r = torch.tensor(every["rewards"])
    formatted = [prompts.has_format(t, "next_state") if s.task == "wm" else prompts.agent_reply_ok(t, s.env)
                 for t in every["texts"]]
    row = {"reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
           "zero_var_frac": float(np.mean(every["zero_var"])), "resp_len": float(np.mean(every["lens"])),
           "resp_len_max": max(every["lens"]), "truncated_frac": float(np.mean(every["cut"])),
           "format_error_rate": 1.0 - float(np.mean(formatted))}
    if s.drop_zero_var:
        row["dropped_groups"] = int(sum(every["zero_var"]))
    if s.task == "wm":
        row.update(wm_hacking_monitor([prompts.extract_next_state(t) for t in every["texts"]], every["truths"],
                                      s.group_size))
    else:
        row.update(success_rate=float(np.mean(every["won"])), invalid_rate=1.0 - float(np.mean(every["valid"])),
                   episode_len=float(np.mean(every["ep_len"])))
    return row


START_KEYS = ("resp_len", "entropy", "format_error_rate", "invalid_rate")  # what the alarms compare with its start


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)

def all_sum(d: common.Dist, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_max(d: common.Dist, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather(d: common.Dist, obj: dict) -> list[dict]:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------
# One GRPO update on a batch of sequences

def prompt_sets(seqs: list[dict], share: bool, most: int) -> list[list[dict]]:
    """The units a micro-batch is filled with: sequences with the same prompt ids (a wm group's G responses; a
    policy task's first steps) in sets of at most `most`, or one sequence each when not sharing. A set larger than
    a micro-batch is split into sets that each carry the prompt: still exact, the prompt is computed once per set.
    Policy steps after the first share only part of their prompt and stay sets of one."""
    if not share:
        return [[q] for q in seqs]
    same: dict[tuple, list[dict]] = {}
    for q in seqs:
        same.setdefault(tuple(q["prompt_ids"]), []).append(q)
    return [g[i:i + most] for g in same.values() for i in range(0, len(g), most)]


def set_width(unit: list[dict], share: bool) -> int:
    """Tokens of a unit's row: prompt + response, or pack_shared's prompt[:-1] + (1 + response) per member."""
    if not share:
        return len(unit[0]["prompt_ids"]) + len(unit[0]["response_ids"])
    return len(unit[0]["prompt_ids"]) - 1 + sum(1 + len(q["response_ids"]) for q in unit)


def micro_batches(seqs: list[dict], s: Settings, d: common.Dist, pad_id: int) -> list[dict]:
    """seqs: {"prompt_ids", "response_ids", "logprobs" (sampler's), "adv"} -> packed micro-batches of at most
    micro_batch sequences (a prompt set is never split across them), rows longest first (length bucketing: similar
    lengths share a batch, little padding). Every rank runs the same number of forward/backward passes (FSDP2
    gathers layers in them): a rank with fewer gets padding batches whose loss weight is 0.
    The loss-side tensors ("mask", "rollout", "adv") have a row per sequence either way; with --share-prompt the
    model-side ones are tree rows (common.pack_shared) and "index" maps their log-probs back to that layout."""
    units = sorted(prompt_sets(seqs, s.share_prompt, s.micro_batch), key=lambda u: -set_width(u, s.share_prompt))
    groups, size = [], s.micro_batch
    for u in units:
        if size + len(u) > s.micro_batch:
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += len(u)
    n_max = int(all_max(d, len(groups))[0])
    out = []
    for k in range(n_max):
        part = groups[k] if k < len(groups) else groups[0] if groups else [[PAD_SEQ]]
        flat = [q for u in part for q in u]
        if s.share_prompt:
            ids, attn, pos, score, index, mask = common.pack_shared(
                [u[0]["prompt_ids"] for u in part], [[q["response_ids"] for q in u] for u in part], pad_id, d.device)
            mb = {"ids": ids, "attn": attn, "pos": pos, "score": score, "index": index, "mask": mask}
            starts = [0] * len(flat)            # the loss layout holds response tokens only
        else:
            ids, attn, mask = common.pack_batch([q["prompt_ids"] for q in flat], [q["response_ids"] for q in flat],
                                                pad_id, d.device)
            mb = {"ids": ids, "attn": attn, "mask": mask}
            starts = [len(q["prompt_ids"]) for q in flat]
        sampler_lp = torch.zeros(mask.shape, dtype=torch.float32)
        for b, (q, a) in enumerate(zip(flat, starts)):
            sampler_lp[b, a:a + len(q["response_ids"])] = torch.tensor(q["logprobs"])
        w = float(k < len(groups))
        real = sum(set_width(u, s.share_prompt) for u in part)
        mb.update(rollout=sampler_lp.to(d.device), weight=w, computed=ids.numel() * w, real=real * w,
                  adv=torch.tensor([q["adv"] for q in flat], dtype=torch.float32, device=d.device))
        out.append(mb)
    return out


def score_micro_batch(scorer, mb: dict, temperature: float, with_entropy: bool = False):
    """-> (logp, entropy or None) in the micro-batch's loss layout ([sequences, tokens], 0 off mb["mask"])."""
    if "index" not in mb:
        return scorer(mb["ids"], mb["attn"], mb["mask"], temperature, with_entropy=with_entropy)
    impl = scorer.lm.config._attn_implementation
    if impl != "sdpa":   # eager adds its mask as floats, flash-attn takes none: the bool tree mask is SDPA's
        raise ValueError(f"--share-prompt needs sdpa attention for its tree mask; the model uses {impl}")
    logp, ent = scorer(mb["ids"], mb["attn"], mb["score"], temperature, with_entropy=with_entropy,
                       position_ids=mb["pos"])

    def per_sequence(x):
        return torch.where(mb["mask"], x.flatten()[mb["index"]], 0.0)
    return per_sequence(logp), per_sequence(ent) if ent is not None else None


PAD_SEQ = {"prompt_ids": [0], "response_ids": [0], "logprobs": [0.0], "adv": 0.0}  # a rank with nothing to train


def grpo_update(seqs: list[dict], scorer, ref_scorer, params, optimizer, scheduler, s: Settings,
                d: common.Dist, pad_id: int) -> dict:
    """ppo_epochs optimizer steps on seqs (this rank's share). Returns global stats; "nonfinite" = skipped."""
    batches = micro_batches(seqs, s, d, pad_id)
    n_tok, n_seq = all_sum(d, sum(len(q["response_ids"]) for q in seqs), len(seqs))
    if n_tok == 0:  # every group dropped on every rank
        return {"skipped": "empty batch"}
    sums = Counter()   # token-weighted stats of this rank
    agree_max, nonfinite, epochs_run = 0.0, False, 0
    for epoch in range(s.ppo_epochs):
        epochs_run += 1
        loss_total = 0.0
        for mb in batches:
            mask = mb["mask"]
            logp, ent = score_micro_batch(scorer, mb, s.temperature, with_entropy=epoch == 0 or s.entropy_coef > 0)
            if epoch == 0:
                mb["old"] = logp.detach()
                if ref_scorer is not None:
                    with torch.no_grad():
                        mb["ref"] = score_micro_batch(ref_scorer, mb, s.temperature)[0]
            w, tokens = mb["weight"], float(mask.sum()) * mb["weight"]
            if epoch == 0:  # before any update: does the trainer see what the sampler sampled?
                diff = (mb["old"] - mb["rollout"]).abs()[mask]
                sums["agree"] += float(diff.sum()) * w
                agree_max = max(agree_max, float(diff.max()) * w)
                top = max(float(mb["old"][mask].max()), float(mb["rollout"][mask].max()))
                if top > LOGP_TOL:   # stop before any update (under torchrun the launcher ends the other ranks)
                    raise RuntimeError(f"a log-prob is above zero ({top:.4g}): the sampler's or the trainer's "
                                       f"log-probs are not normalised; this step's data cannot be trusted")
                sums["entropy"] += float(ent.detach()[mask].sum()) * w
                if s.tis_cap > 0:
                    mb["isw"] = tis_weights(mb["old"], mb["rollout"], mask, s.tis_cap)
                    sums["tis_weight"] += float(mb["isw"][mask].sum()) * w
                    sums["tis_capped"] += float((mb["isw"][mask] >= s.tis_cap).sum()) * w
            k3 = ref_scorer is not None and s.kl == "k3"
            loss, st = grpo_loss(logp, mb["old"], mb["ref"] if k3 else None, mb["adv"], mask, s.clip_low,
                                 s.clip_high, s.beta if k3 else 0.0, s.agg, is_weight=mb.get("isw"))
            scale = w * d.world  # FSDP2 averages gradients over ranks: undo it, the global normaliser is exact
            loss = loss * kernel_scale(mask, s.agg, n_tok, n_seq, s.max_new_tokens) * scale
            if ref_scorer is not None and not k3:
                kl_tok = kl_terms(logp, mb["ref"], s.kl)
                loss = loss + s.beta * scale * aggregate(kl_tok, mask, s.agg, n_tok, n_seq, s.max_new_tokens)
                sums["kl"] += float(kl_tok.detach()[mask].sum()) * w
            elif k3:
                sums["kl"] += st["kl_mean"].item() * tokens
            if s.entropy_coef > 0:
                loss = loss - s.entropy_coef * scale * aggregate(ent, mask, s.agg, n_tok, n_seq, s.max_new_tokens)
            loss.backward()
            loss_total += loss.item() / d.world
            for k in ("clip_frac_low", "clip_frac_high", "ratio_mean"):
                sums[k] += st[k].item() * tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        (loss_total,) = all_sum(d, loss_total)
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            nonfinite = True       # every rank sees the same global numbers, so all skip together
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    keys = ("agree", "entropy", "tis_weight", "tis_capped", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean")
    totals = dict(zip(keys, all_sum(d, *(sums[k] for k in keys))))
    (agree_max,) = all_max(d, agree_max)
    n_updates = epochs_run * n_tok
    computed, real = all_sum(d, sum(mb["computed"] for mb in batches), sum(mb["real"] for mb in batches))
    stats = {"loss": loss_total, "grad_norm": grad_norm, "nonfinite": nonfinite,
             "agree_mean": totals["agree"] / n_tok, "agree_max": agree_max, "entropy": totals["entropy"] / n_tok,
             "train_seqs": int(n_seq), "train_tokens": int(n_tok), "train_tokens_computed": int(computed),
             "pad_frac": 1.0 - real / computed,
             **{k: totals[k] / n_updates for k in ("clip_frac_low", "clip_frac_high", "ratio_mean")}}
    if ref_scorer is not None:
        stats["kl"] = totals["kl"] / n_updates
    if s.tis_cap > 0:
        stats["tis_weight_mean"] = totals["tis_weight"] / n_tok
        stats["tis_capped_frac"] = totals["tis_capped"] / n_tok
    return stats


# ----------------------------------------------------------------------------------------------------------
# The reward of --task wm (tests swap this function for a toy reward)

def make_reward(s: Settings):
    """-> score(samples, triples) -> float tensor [N]: the RWML reward of each sample's text against its triple."""
    from rewards import WorldModelReward, make_judge
    if s.reward_mode.startswith("judge") and not s.judge_model:
        raise SystemExit(f"--reward-mode {s.reward_mode} needs --judge-model (a local model or litellm:<name>)")
    judge = make_judge(s.judge_model) if s.reward_mode.startswith("judge") else None
    wm = WorldModelReward(s.embedder, s.tau_d, s.reward_max_tokens, mode=s.reward_mode, tau_d_user=s.tau_d_user,
                          judge=judge, embed_instruction=s.embed_instruction)
    return lambda samples, triples: wm([x.text for x in samples], triples)


def evaluate_held_out(gen_lm, tokenizer, score, rows: list[dict], ids: list[list[int]], s: Settings,
                      d: common.Dist, step: int) -> float:
    """Mean reward of one sample per held-out triple (greedy by default); ranks take contiguous shards."""
    lo, hi = d.rank * len(rows) // d.world, (d.rank + 1) * len(rows) // d.world
    keys = list(range(lo, hi))
    samples = sample_groups(gen_lm, tokenizer, ids[lo:hi], keys, s, 10**6 + step, 1, s.val_temperature,
                            s.gen_chunk * s.group_size) if hi > lo else []
    hits = float(score(samples, rows[lo:hi]).sum()) if samples else 0.0
    total, count = all_sum(d, hits, hi - lo)
    return total / max(1, count)


# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Path:
    s = common.parse_settings(Settings, argv)
    for k, v in PAPER_DEFAULTS[s.task].items():   # task-dependent paper defaults, written resolved to config.json
        if getattr(s, k) is None:
            setattr(s, k, v)
    d = common.init_distributed()
    s.precision = "bf16" if common.compute_dtype(s.precision, d.device) == torch.bfloat16 else "fp32"   # as config.json says
    out = Path(s.out_dir)
    ckpt_root = out / "ckpt"
    P, G = s.prompts_per_step, s.group_size
    if P % d.world:
        raise SystemExit(f"--prompts-per-step {P} must be a multiple of the world size {d.world} (groups are not split)")
    if s.task == "wm" and (P // d.world) % s.gen_chunk:
        raise SystemExit(f"--gen-chunk {s.gen_chunk} must divide the prompts per rank ({P // d.world})")
    if s.temperature <= 0:
        raise SystemExit("--temperature must be > 0 for training (the trainer scores the sampled distribution)")
    if s.tis_cap and s.tis_cap < 1:
        raise SystemExit(f"--tis-cap {s.tis_cap}: the cap must be >= 1 (or 0 = off)")
    if s.resume:
        common.check_resume(s, out, SAME_ON_RESUME)
    common.seed_everything(s.seed)
    if d.main:
        common.save_config(s, out)
    log = common.MetricsLogger(out / "metrics.jsonl", enabled=d.main)

    # Models: fp32 master weights (lr 1e-6 updates vanish in bf16 weights); training, generation and reference
    # compute in the --precision dtype (common.wrap_for_training). One process generates with the weights it
    # trains on (fp32: the model itself; bf16: its compute copy); under torchrun each rank has a full copy.
    compute_dtype = common.compute_dtype(s.precision, d.device)
    lm, tokenizer = common.load_model(s.model, dtype=torch.float32, device=d.device)
    if s.share_prompt and lm.config._attn_implementation != "sdpa":
        lm.set_attn_implementation("sdpa")   # the tree rows' bool 4-D mask (common.pack_shared) is SDPA's
    ref_lm = copy.deepcopy(lm).to(compute_dtype).eval().requires_grad_(False) if s.beta > 0 else None
    if s.lora_rank:
        from peft import LoraConfig, get_peft_model
        lm = get_peft_model(lm, LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules="all-linear"))
    if s.grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    gen_lm = copy.deepcopy(lm).to(compute_dtype) if d.world > 1 else None   # before sharding: full parameters
    scorer = common.wrap_for_training(lm, d, compute_dtype)
    gen_lm = scorer.lm if gen_lm is None else gen_lm
    ref_scorer = common.TokenLogprobs(ref_lm) if ref_lm is not None else None
    hf_model = lm.get_base_model() if s.lora_rank else lm   # what checkpoints save (save_pretrained, HF keys)

    # Data
    score = suite = None
    if s.task == "wm":
        rows, prompt_ids = load_wm_data(s.data, tokenizer, s.max_prompt_tokens)
        n_items = len(rows)
        score = make_reward(s)
        val_rows, val_ids = load_wm_data(s.val_data, tokenizer, s.max_prompt_tokens) if s.val_data else ([], [])
        if s.val_size:   # a seeded sample: the first rows come from a few episodes of a few games
            keep = common.sample_rows(list(range(len(val_rows))), s.val_size, s.seed)
            val_rows, val_ids = [val_rows[i] for i in keep], [val_ids[i] for i in keep]
    else:
        suite = rollout.make_suite(s.env, s.split, task_type=s.task_type, user_model=s.user_model or None,
                                   device=d.device, n_workers=s.env_workers)
        n_items = len(suite.task_ids)
    total_steps = s.max_steps or int(s.epochs * n_items // P)
    if total_steps < 1:
        raise SystemExit(f"no training steps: {n_items} items, {P} per step, --epochs {s.epochs}")
    params = [p for p in lm.parameters() if p.requires_grad]   # the fp32 master weights (FSDP2: their shards)
    optimizer, scheduler = make_optimizer(s, params, total_steps * s.ppo_epochs)
    common.sync_after_steps(optimizer, scorer.lm, lm)   # one-process bf16: each optimizer step refreshes the copy

    state = {"step": 0, "nonfinite_in_row": 0, "nonfinite_total": 0, "alarm_start": {}, "start_rows": []}
    latest = common.latest_checkpoint(ckpt_root) if s.resume else None
    if latest is not None:
        state.update(common.load_checkpoint(latest, hf_model, optimizer, scheduler)["extra"])
        common.sync_weights(gen_lm, lm)
        common.print0(f"resumed from {latest} at step {state['step']}")
    elif s.resume:
        common.print0(f"--resume: no checkpoint in {ckpt_root}, starting fresh")
    log.restart(state["step"])   # rows past the checkpoint (a kill after logging) or of an earlier run go
    common.print0(f"{s.task}: {total_steps} steps x {P} {'prompts' if s.task == 'wm' else 'tasks'} x G={G}, "
                  f"{n_items} items, world {d.world}, model {s.model}")

    bar = tqdm(range(state["step"], total_steps), initial=state["step"], total=total_steps, disable=not d.main,
               desc=s.task, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        first = step * P + d.rank * (P // d.world)           # this rank's first stream position
        idx = stream(n_items, s.seed, first, P // d.world)
        row = {"step": step + 1, "epoch": round((step + 1) * P / n_items, 4)}

        # 1. generate
        if s.task == "wm":
            triples = [rows[i] for i in idx]
            samples = sample_groups(gen_lm, tokenizer, [prompt_ids[i] for i in idx],
                                    list(range(first, first + len(idx))), s, step, G, s.temperature, s.gen_chunk)
        else:
            act = rollout.model_actor(gen_lm, tokenizer, s.temperature, s.max_new_tokens, s.top_p,
                                      generator_for(d.device, s.seed, step, first))
            episodes = rollout.run_episodes(act, suite, [(suite.task_ids[i], g) for i in idx for g in range(G)],
                                            env=s.env, split=s.split, model=s.model, max_steps=s.max_env_steps,
                                            history=s.history, n_workers=s.env_workers, batch_size=len(idx) * G)
            samples = [st["sample"] for ep in episodes for st in ep["steps"]]
        t_gen = time.perf_counter()

        # 2. score: one reward per group member (a response, or an episode), then group advantages
        if s.task == "wm":
            rewards = score(samples, [t for t in triples for _ in range(G)]).float()
        else:
            from rewards import policy_step_rewards   # the group reward is the episode return (γ = 1)
            rewards = torch.tensor([sum(policy_step_rewards(ep["steps"], ep["success"], s.win_reward, s.step_penalty,
                                                            s.penalize, s.env)) for ep in episodes])
        adv = group_advantages(rewards, G, s.adv_scale)
        zero_var = zero_variance_groups(rewards, G, s.zero_var_std)
        keep_group = ~zero_var if s.drop_zero_var else torch.ones_like(zero_var)   # DAPO's dynamic sampling
        if s.task == "wm":
            seqs = [{"prompt_ids": x.prompt_ids, "response_ids": x.response_ids, "logprobs": x.logprobs,
                     "adv": float(adv[i])} for i, x in enumerate(samples) if keep_group[i // G]]
        else:   # every step of an episode is a sample carrying the episode's advantage
            seqs = [{"prompt_ids": st["sample"].prompt_ids, "response_ids": st["sample"].response_ids,
                     "logprobs": st["sample"].logprobs, "adv": float(adv[e])}
                    for e, ep in enumerate(episodes) if keep_group[e // G] for st in ep["steps"]]
        t_score = time.perf_counter()

        # 3. train
        lr = scheduler.get_last_lr()[0]
        train = grpo_update(seqs, scorer, ref_scorer, params, optimizer, scheduler, s, d, tokenizer.pad_token_id)
        common.sync_weights(gen_lm, lm)
        t_train = time.perf_counter()

        # 4. metrics and diagnostics over all ranks (the agreement and TIS numbers came from the update)
        t_d0 = time.perf_counter()
        local = {"rewards": rewards.tolist(), "zero_var": zero_var.tolist(), "texts": [x.text for x in samples],
                 "lens": [len(x.response_ids) for x in samples], "cut": [not x.finished for x in samples]}
        if s.task == "wm":
            local["truths"] = [t["next_state"] for t in triples]
        else:
            local["won"] = [ep["success"] for ep in episodes]
            local["valid"] = [st["valid"] for ep in episodes for st in ep["steps"]]
            local["ep_len"] = [ep["n_steps"] for ep in episodes]
        row.update(rollout_metrics({k: [v for part in gather(d, local) for v in part[k]] for k in local}, s))
        skipped = train.pop("skipped", None)
        if train.pop("nonfinite", False):
            state["nonfinite_in_row"] += 1
            state["nonfinite_total"] += 1
            if d.main:
                tqdm.write(f"warning: step {step + 1}: non-finite loss or gradient, update skipped "
                           f"({state['nonfinite_in_row']} in a row)")
        elif not skipped:
            state["nonfinite_in_row"] = 0
        row.update(train, nonfinite_skips=state["nonfinite_total"], lr=lr)
        if skipped:
            row["skipped"] = skipped
        if not state["alarm_start"] and "entropy" in row and all(math.isfinite(row.get(k, 0.0)) for k in START_KEYS):
            state["start_rows"].append({k: row[k] for k in START_KEYS if k in row})
            if len(state["start_rows"]) >= s.alarm_warmup:   # start values: the first finite steps' mean, then frozen
                state["alarm_start"] = {k: float(np.mean([r[k] for r in state["start_rows"]]))
                                        for k in state["start_rows"][0]}
        row["alarms"] = check_alarms(row, state["alarm_start"], s)
        t_diag = time.perf_counter() - t_d0

        if s.task == "wm" and val_rows and s.val_every and ((step + 1) % s.val_every == 0 or step + 1 == total_steps):
            row["val_acc"] = evaluate_held_out(gen_lm, tokenizer, score, val_rows, val_ids, s, d, step)
        t_end = time.perf_counter()
        n_resp = int(all_sum(d, sum(len(x.response_ids) for x in samples))[0])
        row.update(time_generate=t_gen - t0, time_score=t_score - t_gen, time_train=t_train - t_score,
                   time_diag=t_diag, time_step=t_end - t0, tokens_per_s=n_resp / (t_end - t0))
        log.log(row)
        if d.main:
            for alarm in row["alarms"]:
                tqdm.write(f"ALARM step {step + 1}: {alarm}")
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", len=f"{row['resp_len']:.0f}",
                            agree=f"{row['agree_mean']:.1e}" if "agree_mean" in row else "-",
                            **({"val": f"{row['val_acc']:.3f}"} if "val_acc" in row else {}))

        state["step"] = step + 1
        if state["nonfinite_in_row"] >= s.max_nonfinite:
            raise SystemExit(f"stopping at step {step + 1}: {state['nonfinite_in_row']} non-finite steps in a row "
                             f"(rewards, loss or gradients; see {out / 'metrics.jsonl'}). Lower --lr, check the "
                             f"reward, or resume from the last checkpoint in {ckpt_root}")
        if (step + 1) % s.save_every == 0 or step + 1 == total_steps:
            common.save_checkpoint(ckpt_root, step + 1, hf_model, tokenizer, optimizer, scheduler,
                                   extra={**state, "data_pos": (step + 1) * P},
                                   lora_scaling=s.lora_alpha / s.lora_rank if s.lora_rank else None)

    # The last checkpoint is the trained model (HF format: common.load_model, evaluate.py, policy RL take it).
    final = ckpt_root / f"step_{total_steps:06d}"
    common.print0(f"trained model: {final}")
    return final


if __name__ == "__main__":
    main()
