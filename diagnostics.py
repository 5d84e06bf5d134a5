"""What train_rwml.py checks every step: the GRPO failure modes that make numbers silently wrong (README
"Diagnostics"). Pure functions on one step's numbers; the alarms print on the console and go to metrics.jsonl.

The thresholds below are not flags: they decide only when an alarm fires, never what is trained. Edit them here.
"""
from __future__ import annotations

import difflib
import math
import re
from collections import Counter

import numpy as np
import torch

import prompts

AGREE_TOL = 0.02       # mean |logp_rollout - logp_train| above this is a sampler/trainer mismatch (fp32 CPU: ~1e-6)
ALARM_WARMUP = 3       # steps averaged into the start values the start-relative alarms compare with
LENGTH_ALARM = 3.0     # mean response length above this multiple of its start: rambling before a collapse
RATE_ALARM = 0.25      # format-error / invalid-action rate this far above its start: the format is being lost
ENTROPY_ALARM = 0.1    # entropy below this fraction of its start: exploration is gone
ZERO_VAR_ALARM = 0.9   # at least this share of zero-variance groups: almost no learning signal
GENERIC_ALARM = 0.3    # top prediction's share above the top truth's by this much: generic predictions (paper §3.4)
MAX_NONFINITE = 5      # this many non-finite steps in a row (each one skipped) stop the run

START_KEYS = ("resp_len", "entropy", "format_error_rate", "invalid_rate")  # what the alarms compare with its start


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


def rollout_metrics(every: dict, group_size: int, drop_zero_var: bool, env: str = "alfworld") -> dict:
    """One step's rollout numbers from the lists gathered over ranks (group members consecutive). World-model
    steps carry "truths" (one next state per prompt), policy steps "won", "valid" and "ep_len"; a policy reply's
    format is its env's (prompts.agent_reply_ok)."""
    r = torch.tensor(every["rewards"])
    all_hit = (r.view(-1, group_size) > 0).all(-1).tolist()   # with the binary reward: every member right
    formatted = [prompts.has_format(t, "next_state") if "truths" in every else prompts.agent_reply_ok(t, env)
                 for t in every["texts"]]
    row = {"reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
           "zero_var_frac": float(np.mean(every["zero_var"])),
           "zero_var_hit_frac": float(np.mean([z and h for z, h in zip(every["zero_var"], all_hit)])),
           "resp_len": float(np.mean(every["lens"])),
           "resp_len_max": max(every["lens"]), "truncated_frac": float(np.mean(every["cut"])),
           "format_error_rate": 1.0 - float(np.mean(formatted))}
    if drop_zero_var:
        row["dropped_groups"] = int(sum(every["zero_var"]))
    if "truths" in every:
        row.update(wm_hacking_monitor([prompts.extract_next_state(t) for t in every["texts"]], every["truths"],
                                      group_size))
    else:
        row.update(success_rate=float(np.mean(every["won"])), invalid_rate=1.0 - float(np.mean(every["valid"])),
                   episode_len=float(np.mean(every["ep_len"])))
    if "anchored" in every:   # GiGPO: the share of steps whose anchor group has others (a step advantage != 0)
        row["gigpo_anchored_frac"] = float(np.mean(every["anchored"])) if every["anchored"] else 0.0
    return row


def check_alarms(row: dict, start: dict) -> list[str]:
    """Alarms for one step's metrics row; `start` holds the mean of the first ALARM_WARMUP steps (empty before)."""
    alarms = [f"non-finite {k}" for k in ("loss", "grad_norm", "reward_mean", "kl", "entropy")
              if isinstance(row.get(k), float) and not math.isfinite(row[k])]
    if row.get("agree_mean", 0.0) > AGREE_TOL:
        alarms.append(f"rollout/trainer log-prob mismatch: mean |diff| {row['agree_mean']:.4f} > {AGREE_TOL} "
                      f"(max {row['agree_max']:.3f}); check temperature/top-p/precision, or use --tis-cap")
    if row.get("zero_var_frac", 0.0) >= ZERO_VAR_ALARM:
        alarms.append(f"{row['zero_var_frac']:.0%} of groups have zero reward variance: almost no learning signal")
    if row.get("wm_top_pred_share", 0.0) - row.get("wm_top_true_share", 0.0) > GENERIC_ALARM:
        alarms.append(f"generic world-model predictions: {row['wm_top_pred_share']:.0%} of predictions are the same "
                      f"text (truths: {row['wm_top_true_share']:.0%})")
    if not start:
        return alarms
    if start["resp_len"] > 0 and row["resp_len"] > LENGTH_ALARM * start["resp_len"]:
        alarms.append(f"response length {row['resp_len']:.0f} > {LENGTH_ALARM}x its start {start['resp_len']:.0f}")
    for key, what in (("format_error_rate", "format-error rate"), ("invalid_rate", "invalid-action rate")):
        if key in row and row[key] > start[key] + RATE_ALARM:
            alarms.append(f"{what} {row[key]:.2f} rose past its start {start[key]:.2f} + {RATE_ALARM}")
    if math.isfinite(row.get("entropy", math.nan)) and row["entropy"] < ENTROPY_ALARM * start["entropy"]:
        alarms.append(f"entropy collapse: {row['entropy']:.4f} < {ENTROPY_ALARM} x start {start['entropy']:.4f}")
    return alarms


def step_alarms(row: dict, state: dict) -> list[str]:
    """check_alarms against the start values, which are the mean of the first ALARM_WARMUP finite steps and then
    stay frozen (state["start_rows"], state["alarm_start"]: the trainer's checkpointed state, so a resumed run
    compares with the same start)."""
    if not state["alarm_start"] and "entropy" in row and all(math.isfinite(row.get(k, 0.0)) for k in START_KEYS):
        state["start_rows"].append({k: row[k] for k in START_KEYS if k in row})
        if len(state["start_rows"]) >= ALARM_WARMUP:
            state["alarm_start"] = {k: float(np.mean([r[k] for r in state["start_rows"]]))
                                    for k in state["start_rows"][0]}
    return check_alarms(row, state["alarm_start"])
