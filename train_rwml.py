"""GRPO for the world model (RWML, paper §2.2) and for the policy (task-success RL), in one flat script.

  python train_rwml.py --config configs/alfworld_wm.json --data runs/filter/filtered.jsonl \
      --val-data runs/collect/triples_val.jsonl --model smollm2-135m --out-dir runs/rwml
  python train_rwml.py --config configs/alfworld_policy.json --model runs/rwml --out-dir runs/policy
  torchrun --nproc_per_node 8 train_rwml.py ...     # FSDP2; each rank owns a contiguous shard of the step's groups

Read top to bottom: Settings (the defaults are the paper's world-model stage; configs/ holds the presets), the
loss (grpo_loss: edit it for an ablation), the two tasks (wm_rollouts, policy_rollouts), models, the update
(grpo_update) and main, whose loop reads: generate and reward -> group advantages -> update -> log.

One step: G responses per prompt (wm) or G episodes per task (policy) from the sampler -> one reward per group
member -> group advantages -> `ppo_epochs` optimizer steps of the clipped GRPO loss on the exact sampled token ids
(prompt ids + response ids as sampled, never re-tokenized text; the loss mask covers the model's own tokens only).

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
diagnostics.py checks every step; alarms go to the console and to the "alarms" key of metrics.jsonl.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
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
import diagnostics
import prompts
import rollout
from kernels import group_advantages
from kernels import grpo_loss as fused_grpo_loss
from kernels.advantages import group_advantages_reference


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
    prompts_per_step: int = common.flag(32, "prompts (wm) / tasks (policy) per step over all ranks (paper: 32 wm; "
                                            "8 policy, configs/*_policy.json)")
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
    beta: float = common.flag(0.001, "KL weight to the frozen start model (paper: 0.001 wm; 0.01 policy, "
                                     "configs/*_policy.json); 0 = no reference model")
    kl: str = common.flag("k3", "KL estimator in the loss: k3 = verl's low_var_kl, k2 = half squared log-ratio, "
                   "k1 = log-ratio, whose expected gradient is zero (E_pi[grad log pi] = 0): k1 acts as --beta 0 plus "
                   "noise and only its logged kl means anything", ["k1", "k2", "k3"])
    adv_scale: str = common.flag("std", "advantage = (r - group mean) / group std, or r - group mean", ["std", "none"])
    step_advantage: str = common.flag("none", "--task policy: gigpo = GiGPO's step-level advantage (arXiv 2505.10978): "
                                      "steps of a group's episodes that saw the same observation form an anchor "
                                      "group; each step adds --gigpo-weight x its return's anchor-group advantage",
                                      ["none", "gigpo"])
    gigpo_gamma: float = common.flag(0.95, "GiGPO: discount of a step's return over its own and later step rewards "
                                           "(paper: 0.95)")
    gigpo_weight: float = common.flag(1.0, "GiGPO: weight ω of the step advantage (paper: 1)")
    echo_coef: float = common.flag(0.0, "--task policy: ECHO (arXiv 2605.24517): + coef x the mean NLL of the "
                                        "observation tokens in the step prompts, in the update's forward (prime-rl's "
                                        "default 0.1; 0 = off)")
    dyna_coef: float = common.flag(0.0, "--task policy: Dyna-style RWML (new here, not in the paper): + C x the "
                                        "world-model GRPO loss on the step's own fresh transitions, in the same update "
                                        "(0 = off)")
    dyna_schedule: str = common.flag("constant", "Dyna: when the world-model term is on: constant = every step; "
                                     "every:K = every K-th step; linear = every step, its weight falling linearly "
                                     "from C at the first step to C/steps at the last")
    dyna_prompts: int = common.flag(32, "Dyna: world-model prompts per step over all ranks, a seeded sample of the "
                                        "step's transitions (rollout.episode_triples: valid actions only)")
    dyna_group_size: int = common.flag(8, "Dyna: G predictions per world-model prompt (RWML's G; paper: 8)")
    dyna_max_new_tokens: int = common.flag(0, "Dyna: response cap of a prediction (0 = --max-new-tokens)")
    entropy_coef: float = common.flag(0.0, "entropy bonus (paper: 0 wm; 0.001 policy, configs/*_policy.json)")
    fused_loss: str = common.flag("auto", "compute the loss with the fused Triton kernel (kernels/grpo_loss.py): "
                                  "auto = on CUDA tensors; off = grpo_loss's PyTorch code (what an ablation edits)",
                                  ["auto", "on", "off"])
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
    # off-policy correction and zero-variance groups (the alarm thresholds are constants in diagnostics.py)
    tis_cap: float = common.flag(0.0, "truncated importance sampling: weight each token by min(pi_train/pi_rollout, C) "
                               "(0 = off)")
    zero_var_std: float = common.flag(0.01, "a group whose reward std is below this carries no signal (zero-variance)")
    drop_zero_var: bool = common.flag(False, "drop zero-variance groups from the batch (DAPO dynamic sampling)")
    # checkpoints
    save_every: int = common.flag(50, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = common.flag(2, "newest checkpoints kept on disk (0 = all: evaluate.py --checkpoints all "
                                           "evaluates each)")


# The defaults are the paper's world-model settings; its policy RL stage differs in these three (8 tasks x 8
# episodes, KL 0.01, entropy 0.001): configs/alfworld_policy.json and configs/tau2_policy.json carry them.
POLICY_PAPER = {"prompts_per_step": 8, "beta": 0.01, "entropy_coef": 0.001}
# settings that define the run (its data, samples, objective or optimizer): --resume refuses to continue under
# others (exact continuation)
SAME_ON_RESUME = ("task", "model", "data", "max_prompt_tokens", "env", "split", "task_type", "max_env_steps", "history",
                  "win_reward", "step_penalty", "penalize", "user_model", "seed", "prompts_per_step", "group_size",
                  "temperature", "top_p", "max_new_tokens", "gen_chunk", "epochs", "max_steps", "lr", "lr_schedule",
                  "warmup_steps", "weight_decay", "grad_clip", "ppo_epochs", "optim", "precision", "lora_rank",
                  "lora_alpha", "agg", "clip_low", "clip_high", "beta", "kl", "adv_scale", "entropy_coef", "embedder",
                  "embed_instruction", "tau_d", "tau_d_user", "reward_max_tokens", "reward_mode", "judge_model",
                  "tis_cap", "zero_var_std", "drop_zero_var", "step_advantage", "gigpo_gamma", "gigpo_weight",
                  "echo_coef", "dyna_coef", "dyna_schedule", "dyna_prompts", "dyna_group_size", "dyna_max_new_tokens")
LOGP_TOL = 1e-3  # a log-prob above this is a bug (wrong normalisation or gather), not rounding


# ----------------------------------------------------------------------------------------------------------
# The GRPO loss: edit here for an ablation, and run it with --fused-loss off (the Triton kernel fuses this standard
# objective; tests/test_trainer_math.py holds the two equal, so an edit here alone fails that test, as it should).

def grpo_loss(logp, entropy, mb: dict, s: Settings, n_tok: float, n_seq: float, world: int, obs_logp=None,
              n_obs: float = 0.0):
    """One micro-batch's share of the step's GRPO loss (paper §2.2: verl's GRPO, token-mean, k3 KL to the start).
    logp, entropy [B, T]: the policy's, with gradient; mb: "old" (log-probs before the update), "ref" (the
    reference's; absent when --beta is 0), "isw" (TIS weights; absent without --tis-cap), "adv" [B], "mask" [B, T]
    (the response tokens), "weight" (0 on a rank's padding micro-batch). n_tok, n_seq: response tokens and
    sequences of the whole step (every micro-batch, every rank). ECHO (--echo-coef): obs_logp, the policy's
    log-probs of the prompts' observation tokens from the same forward (model-side layout, 0 elsewhere),
    mb["obs_count"] the sequences each of those tokens stands for (a shared prompt's: its group's), n_obs the
    step's observation tokens. -> (loss, sums of the logged stats)."""
    m, adv = mb["mask"], mb["adv"]
    # the aggregation as each sequence's token weight over the GLOBAL batch: accumulation and world size change nothing
    if s.agg == "token-mean":              # DAPO, the paper's: every token of the step weighs the same
        row_w = torch.full_like(adv, 1.0 / n_tok)
    elif s.agg == "seq-mean-token-mean":   # the original GRPO: per-sequence token means, then their mean
        row_w = 1.0 / (n_seq * m.sum(1).clamp(min=1))
    else:                                  # Dr. GRPO: token sums over the constant budget max_new_tokens
        row_w = torch.full_like(adv, 1.0 / (n_seq * s.max_new_tokens))
    row_w = row_w * (mb["weight"] * world)   # x world: FSDP2 averages gradients over ranks, the objective sums them
    w = m * row_w[:, None]                   # [B, T] each token's weight in the step's loss
    ref = mb.get("ref")
    if s.fused_loss == "on" or s.fused_loss == "auto" and logp.is_cuda:   # clip, TIS and k3 in one Triton pass
        k3_ref = ref if s.kl == "k3" else None
        loss, sums = fused_grpo_loss(logp, mb["old"], k3_ref, adv, m, row_w, s.clip_low, s.clip_high,
                                     s.beta if k3_ref is not None else 0.0, mb.get("isw"))
        if k3_ref is None:
            del sums["kl_sum"]   # k1 / k2 below
    else:
        a, ratio = adv[:, None], torch.exp((logp - mb["old"]).clamp(-20, 20))
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - s.clip_low, 1 + s.clip_high))   # PPO's pessimistic bound
        loss = (pg * mb.get("isw", 1.0) * w).sum()   # TIS: min(pi_train / pi_rollout, cap) per token
        sums = {"clipped_low": ((a < 0) & (ratio < 1 - s.clip_low) & m).sum(),   # the clip zeroes their gradient
                "clipped_high": ((a > 0) & (ratio > 1 + s.clip_high) & m).sum(), "ratio_sum": (ratio.detach() * m).sum()}
    if ref is not None and "kl_sum" not in sums:   # KL(pi || ref) estimated on samples of pi (Schulman 2020)
        log_ratio = logp - ref
        if s.kl == "k3":    # verl's low_var_kl, with its clamps
            d = (-log_ratio).clamp(-20, 20)
            kl = (d.exp() - d - 1).clamp(max=10)
        else:               # k2's gradient is grad KL(pi || ref); k1's is zero in expectation (E_pi[grad log pi] = 0)
            kl = log_ratio if s.kl == "k1" else 0.5 * log_ratio.square()
        loss = loss + s.beta * (kl * w).sum()
        sums["kl_sum"] = (kl.detach() * m).sum()
    if s.entropy_coef > 0:
        loss = loss - s.entropy_coef * (entropy * w).sum()
    if obs_logp is not None:   # ECHO: token cross-entropy on what the env returned, a mean over the step's tokens
        nll = -(obs_logp * mb["obs_count"]).sum()
        loss = loss + s.echo_coef * nll * (mb["weight"] * world / n_obs)
        sums["echo_nll_sum"] = nll.detach()
    return loss, sums


# ----------------------------------------------------------------------------------------------------------
# Data: a seeded endless stream over the triples (wm) or task ids (policy); step k reads positions k*P..(k+1)*P-1

def stream(n: int, seed: int, start: int, count: int) -> list[int]:
    return [common.epoch_order(n, seed, pos // n)[pos % n] for pos in range(start, start + count)]


def wm_prompts(rows: list[dict], tokenizer, max_prompt_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """The triples whose world-model (RWML) prompt fits max_prompt_tokens, and those prompts' ids: a longer prompt
    is skipped, never truncated (a truncated chat prompt loses the task and the intro)."""
    kept, ids = [], []
    for row in rows:
        p = common.chat_ids(tokenizer, prompts.wm_messages(row))
        if len(p) <= max_prompt_tokens:
            kept.append(row)
            ids.append(p)
    return kept, ids


def load_wm_data(path: str, tokenizer, max_prompt_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """Kept triples and their world-model prompt ids (wm_prompts); the count of skipped ones is printed."""
    rows = [r for r in common.read_jsonl(path, common.TRIPLE_KEYS) if r.get("kept", True)]
    kept, ids = wm_prompts(rows, tokenizer, max_prompt_tokens)
    if len(kept) < len(rows):
        common.print0(f"{path}: skipped {len(rows) - len(kept)} of {len(rows)} triples whose prompt is longer than "
                      f"--max-prompt-tokens {max_prompt_tokens}")
    if not kept:
        raise SystemExit(f"{path}: no usable triples (kept, prompt <= {max_prompt_tokens} tokens)")
    return kept, ids


# ----------------------------------------------------------------------------------------------------------
# Sampling

# sample_groups' generators are keyed by (seed, step, stream position); the held-out check and Dyna's world-model
# samples shift the step by these, so that their keys never meet a training step's
HELD_OUT_KEY, DYNA_KEY = 10**6, 2 * 10**6


def seed_for(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def generator_for(device, *key: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed_for(*key))
    return g


def sample_groups(sampler, tokenizer, prompt_ids: list[list[int]], keys: list[int], s: Settings, step: int,
                  n: int, temperature: float, chunk_prompts: int) -> list[common.Sample]:
    """n samples per prompt, prompt-major. One generate call per chunk_prompts prompts with a generator keyed by
    (seed, step, the chunk's first stream position), so the samples do not depend on how prompts were sharded."""
    device = next(sampler.parameters()).device
    out = []
    for c in range(0, len(prompt_ids), chunk_prompts):
        chunk = [p for p in prompt_ids[c:c + chunk_prompts] for _ in range(n)]
        out += common.generate(sampler, tokenizer, chunk, s.max_new_tokens, temperature, s.top_p,
                               batch_size=len(chunk), generator=generator_for(device, s.seed, step, keys[c]))
    return out


# ----------------------------------------------------------------------------------------------------------
# The two tasks. Each plays one step's rollouts on this rank: G group members per item (a response to a triple's
# prompt, or an episode of a task), members of a group consecutive, one reward per member.

@dataclass
class Rollouts:
    samples: list[list[common.Sample]]   # per member: its response (wm), or its episode's step responses (policy)
    rewards: torch.Tensor                # [members] the group reward of each member
    logs: dict[str, list]                # the task's lists for diagnostics.rollout_metrics (gathered over ranks)
    generate_s: float                    # seconds spent generating (the rest of the call is the reward)
    step_adv: list[list[float]] | None = None   # per member, per sample: GiGPO's step advantage (None = off)
    episodes: list[dict] | None = None          # policy: the members' episodes (Dyna's transitions)


def training_seqs(roll: Rollouts, s: Settings) -> tuple[list[dict], torch.Tensor]:
    """-> (this rank's sequences to train on, [groups] zero-variance flags). Every sample of a member (its response,
    its episode's steps) carries the member's group advantage; GiGPO adds ω x each step's own advantage
    (gigpo_step_advantages); --drop-zero-var leaves groups without signal out (DAPO's dynamic sampling)."""
    G = s.group_size
    adv = group_advantages(roll.rewards, G, s.adv_scale)
    zero_var = diagnostics.zero_variance_groups(roll.rewards, G, s.zero_var_std)
    keep_group = ~zero_var if s.drop_zero_var else torch.ones_like(zero_var)
    seqs = [{"prompt_ids": x.prompt_ids, "response_ids": x.response_ids, "logprobs": x.logprobs,
             "adv": float(adv[i]) if roll.step_adv is None else float(adv[i]) + s.gigpo_weight * roll.step_adv[i][j],
             **({"obs_span": x.obs_span} if s.echo_coef > 0 else {})}
            for i, member in enumerate(roll.samples) if keep_group[i // G] for j, x in enumerate(member)]
    return seqs, zero_var


def make_reward(s: Settings):
    """-> reward_fn(samples, triples) -> float tensor [N]: the RWML reward of each sample's text against its triple
    (tests swap this function for a toy reward)."""
    from rewards import WorldModelReward, make_judge
    if s.reward_mode.startswith("judge") and not s.judge_model:
        raise SystemExit(f"--reward-mode {s.reward_mode} needs --judge-model (a local model or litellm:<name>)")
    judge = make_judge(s.judge_model) if s.reward_mode.startswith("judge") else None
    wm = WorldModelReward(s.embedder, s.tau_d, s.reward_max_tokens, mode=s.reward_mode, tau_d_user=s.tau_d_user,
                          judge=judge, embed_instruction=s.embed_instruction)
    return lambda samples, triples: wm([x.text for x in samples], triples)


def wm_rollouts(sampler, tokenizer, reward_fn, rows: list[dict], prompt_ids: list[list[int]], idx: list[int],
                first: int, step: int, s: Settings) -> Rollouts:
    """--task wm (paper §2.2): G predictions of each triple's next state, each rewarded against the real one."""
    t0 = time.perf_counter()
    triples = [rows[i] for i in idx]
    samples = sample_groups(sampler, tokenizer, [prompt_ids[i] for i in idx], list(range(first, first + len(idx))),
                            s, step, s.group_size, s.temperature, s.gen_chunk)
    generate_s = time.perf_counter() - t0
    rewards = reward_fn(samples, [t for t in triples for _ in range(s.group_size)]).float()
    return Rollouts([[x] for x in samples], rewards, {"truths": [t["next_state"] for t in triples]}, generate_s)


def policy_rollouts(sampler, tokenizer, suite, idx: list[int], first: int, step: int, s: Settings,
                    d: common.Dist) -> Rollouts:
    """--task policy: G episodes per task; the group reward is the episode return (γ = 1), and every step's
    response trains with its episode's advantage."""
    import rewards
    t0 = time.perf_counter()
    act = rollout.model_actor(sampler, tokenizer, s.temperature, s.max_new_tokens, s.top_p,
                              generator_for(d.device, s.seed, step, first), obs_spans=s.echo_coef > 0)
    episodes = rollout.run_episodes(act, suite, [(suite.task_ids[i], g) for i in idx for g in range(s.group_size)],
                                    env=s.env, split=s.split, model=s.model, max_env_steps=s.max_env_steps,
                                    history=s.history, n_workers=s.env_workers, batch_size=len(idx) * s.group_size)
    generate_s = time.perf_counter() - t0
    step_rewards = [rewards.policy_step_rewards(ep["steps"], ep["success"], s.win_reward, s.step_penalty, s.penalize,
                                                s.env) for ep in episodes]
    returns = torch.tensor([sum(r) for r in step_rewards])
    logs = {"won": [ep["success"] for ep in episodes], "valid": [st["valid"] for ep in episodes for st in ep["steps"]],
            "ep_len": [ep["n_steps"] for ep in episodes]}
    step_adv = None
    if s.step_advantage == "gigpo":
        step_adv, anchored = gigpo_step_advantages([[st["obs"] for st in ep["steps"]] for ep in episodes],
                                                   step_rewards, s.group_size, s.gigpo_gamma, s.adv_scale)
        logs["anchored"] = [a for ep in anchored for a in ep]
    return Rollouts([[st["sample"] for st in ep["steps"]] for ep in episodes], returns, logs, generate_s, step_adv,
                    episodes)


def gigpo_step_advantages(states: list[list[str]], step_rewards: list[list[float]], group_size: int, gamma: float,
                          scale: str) -> tuple[list[list[float]], list[list[bool]]]:
    """GiGPO's step-level advantage (arXiv 2505.10978 §4.2): within a group of G episodes of one task (members
    consecutive), the steps whose state (the observation the agent saw, exact text) is the same form an anchor
    group; a step's return is sum_k gamma^k r_{t+k} over its own and later step rewards, and its step advantage is
    the return's group advantage inside its anchor group (kernels.group_advantages' formula: (R - mean) / std or
    R - mean, per --adv-scale). A step alone in its anchor group has nothing to compare with: 0.
    -> (step advantages, in an anchor group of >= 2), both per episode, per step."""
    returns = []
    for rs in step_rewards:
        acc, back = 0.0, []
        for r in reversed(rs):
            acc = r + gamma * acc
            back.append(acc)
        returns.append(back[::-1])
    adv = [[0.0] * len(r) for r in returns]
    anchored = [[False] * len(r) for r in returns]
    for g0 in range(0, len(states), group_size):
        anchors: dict[str, list[tuple[int, int]]] = {}
        for i in range(g0, g0 + group_size):
            for t, state in enumerate(states[i]):
                anchors.setdefault(state, []).append((i, t))
        for steps in anchors.values():
            if len(steps) < 2:
                continue
            r = torch.tensor([returns[i][t] for i, t in steps], dtype=torch.float64)
            for (i, t), a in zip(steps, group_advantages_reference(r, len(steps), scale).tolist()):
                adv[i][t], anchored[i][t] = a, True
    return adv, anchored


def dyna_settings(s: Settings) -> Settings:
    """The settings Dyna's world-model part samples and trains with: the run's, with its own G and response cap,
    and no ECHO (an observation term of the agent prompts)."""
    return dataclasses.replace(s, group_size=s.dyna_group_size,
                               max_new_tokens=s.dyna_max_new_tokens or s.max_new_tokens, echo_coef=0.0)


def dyna_weight(s: Settings, step: int, total_steps: int) -> float:
    """--dyna-schedule: the world-model term's weight at (0-based) step; 0 = no world-model part this step."""
    if s.dyna_schedule == "constant":
        return s.dyna_coef
    if s.dyna_schedule == "linear":
        return s.dyna_coef * (1 - step / total_steps)
    return s.dyna_coef if (step + 1) % int(s.dyna_schedule.removeprefix("every:")) == 0 else 0.0


def dyna_rollouts(sampler, tokenizer, reward_fn, episodes: list[dict], step: int, s: Settings,
                  d: common.Dist) -> Rollouts:
    """Dyna: the world-model task (wm_rollouts) on this step's own transitions: the triples of this rank's episodes
    (rollout.episode_triples, as collect.py makes them; prompts over --max-prompt-tokens skipped), a seeded sample
    of --dyna-prompts / world of them, each predicted G = --dyna-group-size times and rewarded as RWML's. s: the
    Dyna settings (dyna_settings)."""
    triples = [t for ep in episodes for t in rollout.episode_triples(ep, s.history)]
    rows, ids = wm_prompts(triples, tokenizer, s.max_prompt_tokens)
    n = s.dyna_prompts // d.world
    first = d.rank * n      # Dyna's own stream positions, keyed apart from the policy's (DYNA_KEY)
    pick = common.sample_rows(list(range(len(rows))), n, seed_for(s.seed, step, first))
    if not pick:            # no valid action on this rank: nothing to predict (other ranks may still train)
        return Rollouts([], torch.zeros(0), {"truths": []}, 0.0)
    return wm_rollouts(sampler, tokenizer, reward_fn, rows, ids, pick, first, DYNA_KEY + step, s)


def dyna_step(sampler, tokenizer, reward_fn, roll: Rollouts, step: int, weight: float, s: Settings,
              d: common.Dist) -> tuple[list[dict], dict]:
    """Dyna (--dyna-coef; new here, not in the paper): world-model rollouts on the policy step's fresh transitions
    (dyna_rollouts), their group advantages -> (this rank's world-model sequences for grpo_update, which adds their
    GRPO loss at `weight`; the step's metrics over all ranks: rollout_metrics' world-model numbers, the weight and
    the prompts, each prefixed dyna_, and time_dyna, the seconds it took)."""
    t0 = time.perf_counter()
    ds = dyna_settings(s)
    wm = dyna_rollouts(sampler, tokenizer, reward_fn, roll.episodes, step, ds, d)
    seqs, zero_var = training_seqs(wm, ds)
    every = gather_logs(d, wm, zero_var)
    row = {"weight": weight, "prompts": len(every["truths"])}
    if every["rewards"]:
        row.update(diagnostics.rollout_metrics(every, ds.group_size, ds.drop_zero_var, ds.env))
    return seqs, {**{f"dyna_{k}": v for k, v in row.items()}, "time_dyna": time.perf_counter() - t0}


def wm_task(s: Settings, d: common.Dist, sampler, tokenizer):
    """--task wm -> (items, rollouts(idx, first, step), validate(step) or None, None): the kept training triples
    (prompts over --max-prompt-tokens skipped), the RWML reward, and the held-out accuracy check on --val-data."""
    rows, prompt_ids = load_wm_data(s.data, tokenizer, s.max_prompt_tokens)
    reward_fn = make_reward(s)
    val_rows, val_ids = load_wm_data(s.val_data, tokenizer, s.max_prompt_tokens) if s.val_data else ([], [])
    if s.val_size:   # a seeded sample: the first rows come from a few episodes of a few games
        keep = common.sample_rows(list(range(len(val_rows))), s.val_size, s.seed)
        val_rows, val_ids = [val_rows[i] for i in keep], [val_ids[i] for i in keep]
    validate = functools.partial(evaluate_held_out, sampler, tokenizer, reward_fn, val_rows, val_ids, s, d) \
        if val_rows and s.val_every else None
    return (len(rows), functools.partial(wm_rollouts, sampler, tokenizer, reward_fn, rows, prompt_ids, s=s), validate,
            None)


def policy_task(s: Settings, d: common.Dist, sampler, tokenizer):
    """--task policy -> (tasks, rollouts(idx, first, step), None, dyna(roll, step, weight) or None): the env suite's
    tasks (--env, --split, --task-type); no held-out check during training (evaluate.py --what agent measures
    success); with --dyna-coef, Dyna's world-model part (dyna_step) and the RWML reward it needs."""
    suite = rollout.make_suite(s.env, s.split, task_type=s.task_type, user_model=s.user_model or None,
                               device=d.device, n_workers=s.env_workers)
    dyna = functools.partial(dyna_step, sampler, tokenizer, make_reward(s), s=s, d=d) if s.dyna_coef else None
    return len(suite.task_ids), functools.partial(policy_rollouts, sampler, tokenizer, suite, s=s, d=d), None, dyna


def evaluate_held_out(sampler, tokenizer, reward_fn, rows: list[dict], ids: list[list[int]], s: Settings,
                      d: common.Dist, step: int) -> float:
    """--task wm: mean reward of one sample per held-out triple (greedy by default); ranks take contiguous shards."""
    lo, hi = d.rank * len(rows) // d.world, (d.rank + 1) * len(rows) // d.world
    keys = list(range(lo, hi))
    samples = sample_groups(sampler, tokenizer, ids[lo:hi], keys, s, HELD_OUT_KEY + step, 1, s.val_temperature,
                            s.gen_chunk * s.group_size) if hi > lo else []
    hits = float(reward_fn(samples, rows[lo:hi]).sum()) if samples else 0.0
    total, count = all_sum(d, hits, hi - lo)
    return total / max(1, count)


# ----------------------------------------------------------------------------------------------------------
# Models and optimizer

def load_models(s: Settings, d: common.Dist, compute_dtype: torch.dtype):
    """-> (policy, policy_logprobs, reference_logprobs, sampler, tokenizer).
    policy: the trained model, fp32 master weights (lr 1e-6 updates vanish in bf16 weights), peft-wrapped with LoRA.
    policy_logprobs: common.TokenLogprobs over the copy the update computes with (common.wrap_for_training: FSDP2
    under torchrun; in one process the policy itself in fp32, a --precision compute copy in bf16).
    reference_logprobs: the frozen start model's (None when --beta is 0).
    sampler: the generation model, full parameters: one process generates with the weights it trains on (fp32: the
    policy itself; bf16: its compute copy); under torchrun each rank keeps a full copy, synced after each step."""
    policy, tokenizer = common.load_model(s.model, dtype=torch.float32, device=d.device)
    if s.share_prompt and policy.config._attn_implementation != "sdpa":
        policy.set_attn_implementation("sdpa")   # the tree rows' bool 4-D mask (common.pack_shared) is SDPA's
    reference = copy.deepcopy(policy).to(compute_dtype).eval().requires_grad_(False) if s.beta > 0 else None
    if s.lora_rank:
        from peft import LoraConfig, get_peft_model
        policy = get_peft_model(policy, LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules="all-linear"))
    if s.grad_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    sampler = copy.deepcopy(policy).to(compute_dtype) if d.world > 1 else None   # before sharding: full parameters
    policy_logprobs = common.wrap_for_training(policy, d, compute_dtype)
    reference_logprobs = common.TokenLogprobs(reference) if reference is not None else None
    sampler = policy_logprobs.lm if sampler is None else sampler
    return policy, policy_logprobs, reference_logprobs, sampler, tokenizer


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
            ids, attn, pos, logp_mask, index, mask = common.pack_shared(
                [u[0]["prompt_ids"] for u in part], [[q["response_ids"] for q in u] for u in part], pad_id, d.device)
            mb = {"ids": ids, "attn": attn, "pos": pos, "logp_mask": logp_mask, "index": index, "mask": mask}
            starts = [0] * len(flat)            # the loss layout holds response tokens only
        else:
            ids, attn, mask = common.pack_batch([q["prompt_ids"] for q in flat], [q["response_ids"] for q in flat],
                                                pad_id, d.device)
            mb = {"ids": ids, "attn": attn, "mask": mask}
            starts = [len(q["prompt_ids"]) for q in flat]
        sampler_lp = torch.zeros(mask.shape, dtype=torch.float32)
        for b, (q, a) in enumerate(zip(flat, starts)):
            sampler_lp[b, a:a + len(q["response_ids"])] = torch.tensor(q["logprobs"])
        if s.echo_coef > 0:   # ECHO: the observation tokens in the model-side rows (a shared prompt once)
            mb["obs_count"] = torch.zeros(ids.shape, dtype=torch.float32)
            for row, u in enumerate(part if s.share_prompt else [[q] for q in flat]):
                a, b = u[0]["obs_span"]
                mb["obs_count"][row, a:b] = len(u)
            mb["obs_count"] = mb["obs_count"].to(d.device)
            mb["obs"] = mb["obs_count"] > 0
        w = float(k < len(groups))
        real = sum(set_width(u, s.share_prompt) for u in part)
        mb.update(rollout=sampler_lp.to(d.device), weight=w, computed=ids.numel() * w, real=real * w,
                  adv=torch.tensor([q["adv"] for q in flat], dtype=torch.float32, device=d.device))
        out.append(mb)
    return out


def micro_batch_logprobs(model_logprobs, mb: dict, temperature: float, with_entropy: bool = False,
                         observations: bool = False):
    """-> (logp, entropy or None, obs_logp or None) of a common.TokenLogprobs model: logp and entropy in the
    micro-batch's loss layout ([sequences, tokens], 0 off mb["mask"]); with observations (ECHO), from the same
    forward, the log-probs of the prompts' observation tokens in the model-side layout (0 off mb["obs"])."""
    shared = "index" in mb
    score = mb["logp_mask"] if shared else mb["mask"]
    if shared and model_logprobs.lm.config._attn_implementation != "sdpa":
        # eager adds its mask as floats, flash-attn takes none: the bool tree mask is SDPA's
        raise ValueError(f"--share-prompt needs sdpa attention for its tree mask; the model uses "
                         f"{model_logprobs.lm.config._attn_implementation}")
    logp, ent = model_logprobs(mb["ids"], mb["attn"], score | mb["obs"] if observations else score, temperature,
                               with_entropy=with_entropy, **({"position_ids": mb["pos"]} if shared else {}))
    obs_logp = torch.where(mb["obs"], logp, 0.0) if observations else None

    def response(x):
        if shared:
            return torch.where(mb["mask"], x.flatten()[mb["index"]], 0.0)
        return torch.where(mb["mask"], x, 0.0) if observations else x
    return response(logp), response(ent) if ent is not None else None, obs_logp


# a rank with nothing to train
PAD_SEQ = {"prompt_ids": [0], "response_ids": [0], "logprobs": [0.0], "adv": 0.0, "obs_span": (0, 0)}


@dataclass
class LossPart:
    """One objective of the update over its own sequences: the policy's GRPO loss, or Dyna's world-model one. Each
    is normalised over its own tokens and sequences (grpo_loss); their weighted sum is what the optimizer steps on."""
    seqs: list[dict]
    weight: float
    s: Settings
    prefix: str = ""   # of its keys in the returned stats

    def prepare(self, d: common.Dist, pad_id: int) -> None:
        self.batches = micro_batches(self.seqs, self.s, d, pad_id)
        self.n_tok, self.n_seq, self.n_obs = all_sum(
            d, sum(len(q["response_ids"]) for q in self.seqs), len(self.seqs),
            sum(q["obs_span"][1] - q["obs_span"][0] for q in self.seqs if self.s.echo_coef > 0))
        self.sums = Counter()   # token-weighted stats of this rank
        self.agree_max, self.loss = 0.0, 0.0


def grpo_update(seqs: list[dict], policy_logprobs, reference_logprobs, params, optimizer, scheduler, s: Settings,
                d: common.Dist, pad_id: int, dyna: tuple[list[dict], float] | None = None,
                policy_is_reference: bool = False) -> dict:
    """ppo_epochs optimizer steps on seqs (this rank's share). Returns global stats; "nonfinite" = skipped.
    policy_is_reference: the policy still has the reference's weights (no optimizer step yet in this run, e.g. its
    first steps' groups were all dropped), so the reference's log-probs are the policy's own first ones and its
    forward is skipped (that step's KL is 0).
    dyna (Dyna, --dyna-coef): (this rank's world-model sequences, their weight w): each optimizer step descends
    the policy loss + w x the world-model GRPO loss (under dyna_settings: no ECHO), each normalised over its own
    sequences, their gradients accumulated into one step; that part's stats come back as dyna_* ("dyna_loss": its
    loss without w). Every rank passes dyna on the same steps (the schedule is global)."""
    parts = [LossPart(seqs, 1.0, s)] + ([LossPart(dyna[0], dyna[1], dyna_settings(s), "dyna_")] if dyna else [])
    for part in parts:
        part.prepare(d, pad_id)
    parts = [part for part in parts if part.n_tok > 0]   # a part empty on every rank (all groups dropped) is left out
    if not parts:
        return {"skipped": "empty batch"}
    nonfinite, epochs_run = False, 0
    for epoch in range(s.ppo_epochs):
        epochs_run += 1
        for part in parts:
            part.loss = 0.0
            ps, sums, echo = part.s, part.sums, part.n_obs > 0   # ECHO's term: --echo-coef > 0 and observation tokens
            for mb in part.batches:
                mask = mb["mask"]
                logp, ent, obs_logp = micro_batch_logprobs(policy_logprobs, mb, ps.temperature,
                                                           with_entropy=epoch == 0 or ps.entropy_coef > 0,
                                                           observations=echo)
                if epoch == 0:
                    mb["old"] = logp.detach()
                    if reference_logprobs is not None:
                        if policy_is_reference:
                            mb["ref"] = mb["old"]
                        else:
                            with torch.no_grad():
                                mb["ref"] = micro_batch_logprobs(reference_logprobs, mb, ps.temperature)[0]
                w = mb["weight"]
                if epoch == 0:  # before any update: does the trainer see what the sampler sampled?
                    diff = (mb["old"] - mb["rollout"]).abs()[mask]
                    sums["agree"] += float(diff.sum()) * w
                    part.agree_max = max(part.agree_max, float(diff.max()) * w)
                    top = max(float(mb["old"][mask].max()), float(mb["rollout"][mask].max()))
                    if top > LOGP_TOL:   # stop before any update (under torchrun the launcher ends the other ranks)
                        raise RuntimeError(f"a log-prob is above zero ({top:.4g}): the sampler's or the trainer's "
                                           f"log-probs are not normalised; this step's data cannot be trusted")
                    sums["entropy"] += float(ent.detach()[mask].sum()) * w
                    if ps.tis_cap > 0:
                        mb["isw"] = diagnostics.tis_weights(mb["old"], mb["rollout"], mask, ps.tis_cap)
                        sums["tis_weight"] += float(mb["isw"][mask].sum()) * w
                        sums["tis_capped"] += float((mb["isw"][mask] >= ps.tis_cap).sum()) * w
                loss, mb_sums = grpo_loss(logp, ent, mb, ps, part.n_tok, part.n_seq, d.world, obs_logp, part.n_obs)
                (part.weight * loss).backward()
                part.loss += loss.item() / d.world
                for k, v in mb_sums.items():
                    sums[k] += float(v) * w
            (part.loss,) = all_sum(d, part.loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (all(math.isfinite(part.loss) for part in parts) and math.isfinite(grad_norm)):
            nonfinite = True       # every rank sees the same global numbers, so all skip together
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    stats = {part.prefix + k: v for part in parts
             for k, v in part_stats(part, epochs_run, reference_logprobs is not None, d).items()}
    return {**stats, "grad_norm": grad_norm, "nonfinite": nonfinite}


def part_stats(part: LossPart, epochs_run: int, kl: bool, d: common.Dist) -> dict:
    """The logged numbers of one LossPart after the update: its loss (the last epoch's), sampler/trainer agreement,
    entropy, sizes, clip fractions and ratio, and KL, ECHO's NLL and TIS where they apply."""
    keys = ("agree", "entropy", "tis_weight", "tis_capped", "kl_sum", "clipped_low", "clipped_high", "ratio_sum",
            "echo_nll_sum")
    totals = dict(zip(keys, all_sum(d, *(part.sums[k] for k in keys))))
    (agree_max,) = all_max(d, part.agree_max)
    n_tok, n_updates = part.n_tok, epochs_run * part.n_tok
    computed, real = all_sum(d, sum(mb["computed"] for mb in part.batches), sum(mb["real"] for mb in part.batches))
    stats = {"loss": part.loss, "agree_mean": totals["agree"] / n_tok, "agree_max": agree_max,
             "entropy": totals["entropy"] / n_tok, "train_seqs": int(part.n_seq), "train_tokens": int(n_tok),
             "train_tokens_computed": int(computed), "pad_frac": 1.0 - real / computed,
             "clip_frac_low": totals["clipped_low"] / n_updates, "clip_frac_high": totals["clipped_high"] / n_updates,
             "ratio_mean": totals["ratio_sum"] / n_updates}
    if kl:
        stats["kl"] = totals["kl_sum"] / n_updates
    if part.n_obs > 0:   # ECHO: the mean over the epochs' forwards (the first one's alone with --ppo-epochs 1)
        stats["echo_nll"] = totals["echo_nll_sum"] / (epochs_run * part.n_obs)
    if part.s.tis_cap > 0:
        stats["tis_weight_mean"] = totals["tis_weight"] / n_tok
        stats["tis_capped_frac"] = totals["tis_capped"] / n_tok
    return stats


# ----------------------------------------------------------------------------------------------------------

def check_settings(s: Settings, d: common.Dist) -> None:
    """Refuse settings that cannot train; warn when policy RL runs with the world-model defaults."""
    wm_defaults = [k for k in POLICY_PAPER if getattr(s, k) == getattr(Settings, k)]
    if s.task == "policy" and wm_defaults and d.main:
        print(f"warning: --task policy with the world-model defaults of {', '.join(wm_defaults)} (paper's policy RL: "
              f"{', '.join(f'{k} {POLICY_PAPER[k]}' for k in wm_defaults)}); pass --config configs/alfworld_policy.json "
              f"or configs/tau2_policy.json", flush=True)
    P = s.prompts_per_step
    if P % d.world:
        raise SystemExit(f"--prompts-per-step {P} must be a multiple of the world size {d.world} (groups are not "
                         f"split)")
    if s.task == "wm" and (P // d.world) % s.gen_chunk:
        raise SystemExit(f"--gen-chunk {s.gen_chunk} must divide the prompts per rank ({P // d.world})")
    if s.temperature <= 0:
        raise SystemExit("--temperature must be > 0 for training (the trainer scores the sampled distribution)")
    if s.step_advantage != "none" and s.task != "policy":
        raise SystemExit(f"--step-advantage {s.step_advantage} is for --task policy (its steps and their states)")
    if s.echo_coef and s.task != "policy":
        raise SystemExit(f"--echo-coef {s.echo_coef} is for --task policy (the observations in the agent prompts)")
    if s.echo_coef and s.env == "tau2":
        raise SystemExit(f"--echo-coef {s.echo_coef}: ECHO marks the observation in the text-game agent prompt; a τ² "
                         "agent's prompt is τ²'s own conversation, which carries no such mark")
    if s.dyna_coef:
        check_dyna(s, d)
    if s.tis_cap and s.tis_cap < 1:
        raise SystemExit(f"--tis-cap {s.tis_cap}: the cap must be >= 1 (or 0 = off)")


def check_dyna(s: Settings, d: common.Dist) -> None:
    """Dyna's settings: policy RL on a text game, a schedule it knows, prompts that split over the ranks."""
    if s.task != "policy":
        raise SystemExit(f"--dyna-coef {s.dyna_coef} is for --task policy (the world-model task on the policy's own "
                         "transitions); --task wm is RWML alone")
    if s.env == "tau2":
        raise SystemExit(f"--dyna-coef {s.dyna_coef}: text games only. A τ² world-model prompt needs the collect "
                         "stage's history (5 turns; the policy's --history is the text-game agent's) and 5-8k tokens "
                         "each (--max-prompt-tokens)")
    if s.dyna_coef < 0:
        raise SystemExit(f"--dyna-coef {s.dyna_coef} must be >= 0 (a weight on the world-model loss)")
    if not re.fullmatch(r"constant|linear|every:[1-9][0-9]*", s.dyna_schedule):
        raise SystemExit(f"--dyna-schedule {s.dyna_schedule!r}: expected constant, linear or every:K (K >= 1)")
    if s.dyna_prompts < d.world or s.dyna_prompts % d.world:
        raise SystemExit(f"--dyna-prompts {s.dyna_prompts} must be a positive multiple of the world size {d.world}")
    if s.dyna_group_size < 2:
        raise SystemExit(f"--dyna-group-size {s.dyna_group_size}: a group advantage needs G >= 2")


def resume(s: Settings, ckpt_root: Path, checkpoint_model, sampler, policy, optimizer, scheduler) -> dict:
    """The trainer state of a fresh run, or of out_dir's latest checkpoint under --resume (weights, optimizer,
    scheduler and RNG restored with it)."""
    state = {"step": 0, "nonfinite_in_row": 0, "nonfinite_total": 0, "alarm_start": {}, "start_rows": []}
    latest = common.latest_checkpoint(ckpt_root) if s.resume else None
    if latest is not None:
        state.update(common.load_checkpoint(latest, checkpoint_model, optimizer, scheduler)["extra"])
        common.sync_weights(sampler, policy)
        common.print0(f"resumed from {latest} at step {state['step']}")
    elif s.resume:
        common.print0(f"--resume: no checkpoint in {ckpt_root}, starting fresh")
    return state


def count_nonfinite(state: dict, train: dict, step: int, d: common.Dist) -> dict:
    """Counts the updates grpo_update skipped for a non-finite loss or gradient (all ranks together); -> the
    update's entries of the metrics row."""
    skipped = train.pop("skipped", None)
    if train.pop("nonfinite", False):
        state["nonfinite_in_row"] += 1
        state["nonfinite_total"] += 1
        if d.main:
            tqdm.write(f"warning: step {step + 1}: non-finite loss or gradient, update skipped "
                       f"({state['nonfinite_in_row']} in a row)")
    elif not skipped:
        state["nonfinite_in_row"] = 0
    return {**train, "nonfinite_skips": state["nonfinite_total"], **({"skipped": skipped} if skipped else {})}


def gather_logs(d: common.Dist, roll: Rollouts, zero_var: torch.Tensor) -> dict[str, list]:
    """The step's per-member and per-sample lists from every rank, for diagnostics.rollout_metrics."""
    samples = [x for member in roll.samples for x in member]
    local = {"rewards": roll.rewards.tolist(), "zero_var": zero_var.tolist(), "texts": [x.text for x in samples],
             "lens": [len(x.response_ids) for x in samples], "cut": [not x.finished for x in samples], **roll.logs}
    return {k: [v for part in gather(d, local) for v in part[k]] for k in local}


def show(bar, row: dict) -> None:
    """The console: alarms as lines, the step's headline numbers on the progress bar."""
    for alarm in row["alarms"]:
        tqdm.write(f"ALARM step {row['step']}: {alarm}")
    bar.set_postfix(reward=f"{row['reward_mean']:.3f}", len=f"{row['resp_len']:.0f}",
                    agree=f"{row['agree_mean']:.1e}" if "agree_mean" in row else "-",
                    **({"val": f"{row['val_acc']:.3f}"} if "val_acc" in row else {}))


def main(argv: list[str] | None = None) -> Path:
    s = common.parse_settings(Settings, argv)
    d = common.init_distributed()
    compute_dtype = common.compute_dtype(s.precision, d.device)
    s.precision = "bf16" if compute_dtype == torch.bfloat16 else "fp32"   # resolved, as config.json says
    check_settings(s, d)
    out, ckpt_root = Path(s.out_dir), Path(s.out_dir) / "ckpt"
    if s.resume:
        common.check_resume(s, out, SAME_ON_RESUME)
    common.seed_everything(s.seed)
    if d.main:
        common.save_config(s, out)
    log = common.MetricsLogger(out / "metrics.jsonl", enabled=d.main)
    policy, policy_logprobs, reference_logprobs, sampler, tokenizer = load_models(s, d, compute_dtype)
    checkpoint_model = policy.get_base_model() if s.lora_rank else policy   # save_pretrained with the HF keys
    P, G = s.prompts_per_step, s.group_size

    # the task: its items (triples or env tasks) and what one step plays on them
    n_items, rollouts, validate, dyna = (wm_task if s.task == "wm" else policy_task)(s, d, sampler, tokenizer)
    total_steps = s.max_steps or int(s.epochs * n_items // P)
    if total_steps < 1:
        raise SystemExit(f"no training steps: {n_items} items, {P} per step, --epochs {s.epochs}")
    params = [p for p in policy.parameters() if p.requires_grad]   # the fp32 master weights (FSDP2: their shards)
    optimizer, scheduler = make_optimizer(s, params, total_steps * s.ppo_epochs)
    common.sync_after_steps(optimizer, policy_logprobs.lm, policy)   # one-process bf16: refresh the compute copy
    state = resume(s, ckpt_root, checkpoint_model, sampler, policy, optimizer, scheduler)
    log.restart(state["step"])   # rows past the checkpoint (a kill after logging) or of an earlier run go
    common.print0(f"{s.task}: {total_steps} steps x {P} {'prompts' if s.task == 'wm' else 'tasks'} x G={G}, "
                  f"{n_items} items, world {d.world}, model {s.model}")

    bar = tqdm(range(state["step"], total_steps), initial=state["step"], total=total_steps, disable=not d.main,
               desc=s.task, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        first = step * P + d.rank * (P // d.world)           # this rank's first stream position
        # 1. generate and reward: G responses (wm) or G episodes (policy) per item, one reward each
        roll = rollouts(stream(n_items, s.seed, first, P // d.world), first, step)
        t_gen = t0 + roll.generate_s
        # 2. group advantages: each sample trains with its member's (training_seqs). Dyna (--dyna-coef): the
        #    world-model task on this step's own transitions, its loss added to the update's at weight w
        seqs, zero_var = training_seqs(roll, s)
        w = dyna_weight(s, step, total_steps) if dyna else 0.0
        wm_seqs, wm_row = dyna(roll, step, w) if w else (None, {})
        t_score = time.perf_counter()
        # 3. update: ppo_epochs optimizer steps of the GRPO loss, then the sampler takes the new weights
        lr = scheduler.get_last_lr()[0]
        # (the scheduler steps with every optimizer step, and a checkpoint restores it: its count is the run's)
        train = grpo_update(seqs, policy_logprobs, reference_logprobs, params, optimizer, scheduler, s, d,
                            tokenizer.pad_token_id, (wm_seqs, w) if w else None,
                            policy_is_reference=scheduler.last_epoch == 0)
        common.sync_weights(sampler, policy)
        t_train = time.perf_counter()
        # 4. log: the rollouts over all ranks, the update's stats (agreement, TIS), alarms, held-out accuracy
        row = {"step": step + 1, "epoch": round((step + 1) * P / n_items, 4),
               **diagnostics.rollout_metrics(gather_logs(d, roll, zero_var), G, s.drop_zero_var, s.env),
               **count_nonfinite(state, train, step, d), **wm_row, "lr": lr}
        row["alarms"] = diagnostics.step_alarms(row, state)
        t_diag = time.perf_counter() - t_train
        if validate and ((step + 1) % s.val_every == 0 or step + 1 == total_steps):
            row["val_acc"] = validate(step)
        t_end = time.perf_counter()
        n_resp = int(all_sum(d, sum(len(x.response_ids) for member in roll.samples for x in member))[0])
        row.update(time_generate=t_gen - t0, time_score=t_score - t_gen, time_train=t_train - t_score,
                   time_diag=t_diag, time_step=t_end - t0, tokens_per_s=n_resp / (t_end - t0))
        log.log(row)
        if d.main:
            show(bar, row)
        state["step"] = step + 1
        if state["nonfinite_in_row"] >= diagnostics.MAX_NONFINITE:
            raise SystemExit(f"stopping at step {step + 1}: {state['nonfinite_in_row']} non-finite steps in a row "
                             f"(rewards, loss or gradients; see {out / 'metrics.jsonl'}). Lower --lr, check the "
                             f"reward, or resume from the last checkpoint in {ckpt_root}")
        if (step + 1) % s.save_every == 0 or step + 1 == total_steps:
            common.save_checkpoint(ckpt_root, step + 1, checkpoint_model, tokenizer, optimizer, scheduler,
                                   extra={**state, "data_pos": (step + 1) * P},
                                   keep=s.keep_checkpoints or total_steps,
                                   lora_scaling=s.lora_alpha / s.lora_rank if s.lora_rank else None)

    # The last checkpoint is the trained model (HF format: common.load_model, evaluate.py, policy RL take it).
    final = ckpt_root / f"step_{total_steps:06d}"
    common.print0(f"trained model: {final}")
    return final


if __name__ == "__main__":
    main()
