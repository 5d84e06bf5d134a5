"""World-model SFT and RWML's "too easy" subsampling (paper §2.2).

    python filter.py --triples runs/collect/triples_train.jsonl --val-triples runs/collect/triples_val.jsonl
        1. SFT a filter model on the validation triples (supervised next-state prediction)
        2. sample K predictions per training triple at temperature 1.0, score each with the world-model reward
           at the strict threshold (tau_d 0.1 ALFWorld, 0.15 τ² user replies); --k 0 skips 2-3, keeping every triple
        3. easy = at least one hit; keep easy triples with probability p = 0.1, all others (--hard-tau-d, not
           the paper's: drop the triples none of whose K predictions earns a training reward)
           -> out_dir/filtered.jsonl (each triple + easy_hits, too_hard, easy, kept) and out_dir/summary.json
    python filter.py --sft-only --triples runs/collect/triples_train.jsonl --out-dir runs/wm_sft
        the paper's WM SFT baseline: the same SFT on the training triples; the checkpoint is the product.

Early Experience's baselines (RWML Table 2), on collect.py --policy expert --alternatives K data in runs/expert:
    imitation learning:  filter.py --sft-only --triples "" --agent-episodes runs/expert/episodes.jsonl --out-dir runs/il
    IWM, two runs:       filter.py --sft-only --triples runs/expert/triples_alt.jsonl --out-dir runs/iwm_wm
                         filter.py --sft-only --model runs/iwm_wm --triples "" --agent-episodes
                             runs/expert/episodes.jsonl --out-dir runs/iwm
                         (next-state prediction on the alternative actions' outcomes, then imitation learning)
    self-reflection:     filter.py --sft-only --triples "" --agent-episodes runs/expert/episodes.jsonl
                             --reflections runs/expert/triples_alt.jsonl --out-dir runs/sr
                         (--model writes a rationale per expert state first, out_dir/rationales/; the SFT trains on
                         the rationale + expert action examples mixed with the imitation examples)

The SFT label is "<think> </think>\\n<next_state> {s} </next_state>" + EOS, loss on the label tokens only; the prompt
is the paper's WM SFT prompt (predict directly, prompts.wm_messages style "sft"; --sft-prompt rwml: the RWML one).
Checkpoints go to out_dir/ckpt/step_N (common.load_model(path) loads one); a rerun resumes from the latest,
and scoring skips triples already scored. Under torchrun the SFT runs under FSDP2 and each rank scores a
disjoint shard of the training triples into out_dir/scored/rank{r}.jsonl; rank 0 merges.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import prompts
import rollout



@dataclass
class Settings:
    """WM SFT (the paper's baseline) and the "too easy" filter (RWML §2.2)."""
    triples: str = common.flag("runs/collect/triples_train.jsonl", "training triples (rows with kept=false are "
                               "skipped); '' = none (--sft-only on agent examples alone, e.g. imitation learning)")
    val_triples: str = common.flag("runs/collect/triples_val.jsonl", "validation triples: the filter model's SFT data")
    out_dir: str = common.flag("runs/filter", "config.json, metrics.jsonl, ckpt/, scored/, filtered.jsonl, summary.json")
    model: str = common.flag("smollm2-135m", "base model: tiny | smollm2-135m | HF id | path")
    sft_only: bool = common.flag(False, "SFT only, save the checkpoint, stop: the WM SFT baseline on --triples; IL, "
                                 "IWM and SR with --agent-episodes / --reflections")
    agent_episodes: str = common.flag("", "episodes.jsonl: every valid step adds an agent example (the agent's prompt, "
                                      "the action taken with an empty thought) to the SFT. Expert episodes "
                                      "(collect.py --policy expert): imitation learning; random actions (collect.py "
                                      "--explore 1): the answer format only, not the task")
    history: int = common.flag(2, "past turns in the agent prompts of --agent-episodes (paper: 2 ALFWorld, 5 τ²)")
    reflections: str = common.flag("", "alternative-action triples (collect.py --alternatives: triples_alt.jsonl): "
                                   "self-reflection; per expert state --model writes why the expert action beats the "
                                   "alternatives, given where each leads (--temperature, --max-new-tokens), and the "
                                   "SFT adds (agent prompt -> rationale as the thought + expert action) examples")
    sft_prompt: str = common.flag("paper", "prompt of the SFT and the filter's predictions: paper = the WM SFT "
                                  "prompt (predict directly); rwml = the RWML reasoning prompt", ["paper", "rwml"])
    seed: int = common.flag(0, "data order, sampling and the keep coin")
    precision: str | None = common.flag(None, "fp32 | bf16: SFT forward/backward and the predictions in bf16 (over fp32 "
                                        "master weights); none = bf16 on CUDA, fp32 on CPU", ["fp32", "bf16"])
    # stage 1: SFT (paper: 2 epochs, lr 2e-6, batch 32)
    epochs: int = common.flag(2, "SFT epochs (0: score with the base model)")
    max_steps: int = common.flag(0, "stop the SFT after this many optimizer steps (0: all of --epochs), e.g. "
                                    "RWML's step count")
    lr: float = common.flag(2e-6, "AdamW learning rate (constant)")
    batch_size: int = common.flag(32, "effective batch (triples per optimizer step, all ranks together)")
    micro_batch: int = common.flag(4, "triples per forward/backward on one rank; accumulation fills the batch")
    grad_clip: float = common.flag(1.0, "max global grad norm (0: off)")
    truncate_prompt_tokens: int = common.flag(1500, "longer prompts are left-truncated (the oldest history goes "
                                                    "first); train_rwml.py --max-prompt-tokens skips them instead")
    save_every: int = common.flag(100, "optimizer steps between checkpoints")
    # stage 2: the filter (paper: K 10, temperature 1.0, strict tau_d 0.1 ALFWorld / 0.15 τ², p 0.1)
    k: int = common.flag(10, "predictions sampled per training triple (0: none, every triple kept: the rule is off)")
    temperature: float = common.flag(1.0, "sampling temperature of the predictions")
    max_new_tokens: int = common.flag(256, "max tokens per prediction (the filter's next states, SR's rationales)")
    triples_per_chunk: int = common.flag(8, "triples scored together; their rows are appended as one resumable unit")
    gen_batch_size: int = common.flag(32, "sequences per generate batch")
    embedder: str = common.flag("minilm", "reward embedder: minilm | a sentence-transformers id")
    embed_instruction: str = common.flag("auto", "truth-side instruction: auto (if an instruct embedder) | none | text")
    tau_d: float = common.flag(0.1, "strict threshold on 1 - cos for observations (paper: 0.1 ALFWorld)")
    tau_d_user: float = common.flag(0.15, "strict threshold for τ² user replies (paper: 0.15)")
    reward_max_tokens: int = common.flag(100, "truncate predictions to this many tokens (paper: 100 ALFWorld, 512 τ²)")
    min_hits: int = common.flag(1, "a triple is easy when at least this many of its K predictions hit")
    keep_p: float = common.flag(0.1, "probability of keeping an easy triple")
    hard_tau_d: float = common.flag(0.0, "not in the paper: a triple is too hard, and dropped, when none of its K "
                                    "predictions earns a training reward at this threshold (e.g. train_rwml's "
                                    "--tau-d 0.2): its RWML groups would all score 0; 0 = off (the paper keeps them)")
    hard_tau_d_user: float = common.flag(0.4, "--hard-tau-d's threshold for τ² user replies (train_rwml's "
                                         "--tau-d-user); a tool reply counts when its ROUGE-L is above 0")


# ----------------------------------------------------------------------------------------------------------
# The easy/keep rule (pure, so tests can check it on crafted hit counts)

def unit_hash(*parts) -> float:
    """A uniform number in [0, 1) from a stable hash of parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def mark(triple_id: str, hits: int, keep_p: float, seed: int, min_hits: int = 1,
         too_hard: bool = False) -> tuple[bool, bool]:
    """-> (easy, kept). Easy: >= min_hits of the K predictions hit. Easy triples are kept with probability
    keep_p, too hard ones (--hard-tau-d) never, all others always. The coin is a hash of (seed, id): every run,
    rank and resume agrees."""
    easy = hits >= min_hits
    return easy, not too_hard and ((not easy) or unit_hash(seed, triple_id) < keep_p)


# ----------------------------------------------------------------------------------------------------------
# Data

def load_triples(path) -> list[dict]:
    """Triples (common.TRIPLE_KEYS); rows of a filtered.jsonl with kept=false are skipped. Ids must be unique:
    resuming matches rows by id."""
    rows = [r for r in common.read_jsonl(path, common.TRIPLE_KEYS) if r.get("kept", True)]
    seen = set()
    for r in rows:
        if r["id"] in seen:
            raise common.DataError(f"{path}: duplicate triple id {r['id']!r}")
        seen.add(r["id"])
    return rows


SFT_PROMPT_STYLE = {"paper": "sft", "rwml": "rwml"}  # --sft-prompt -> prompts.wm_messages style


def wm_prompts(tokenizer, triples: list[dict], truncate_prompt_tokens: int,
               sft_prompt: str = "paper") -> list[list[int]]:
    """World-model prompt ids, left-truncated to truncate_prompt_tokens (the oldest history goes first)."""
    out = [common.chat_ids(tokenizer, prompts.wm_messages(t, SFT_PROMPT_STYLE[sft_prompt])) for t in triples]
    if cut := sum(len(ids) > truncate_prompt_tokens for ids in out):
        common.print0(f"warning: {cut} of {len(triples)} prompts were longer than --truncate-prompt-tokens "
                      f"{truncate_prompt_tokens} and were left-truncated")
    return [ids[-truncate_prompt_tokens:] for ids in out]


def sft_examples(tokenizer, triples: list[dict], truncate_prompt_tokens: int,
                 sft_prompt: str = "paper") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, label ids) per triple; the label is the WM SFT target + EOS."""
    labels = [tokenizer(prompts.wm_sft_target(t["next_state"]), add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id] for t in triples]
    return list(zip(wm_prompts(tokenizer, triples, truncate_prompt_tokens, sft_prompt), labels))


# ----------------------------------------------------------------------------------------------------------
# Stage 1: supervised next-state prediction

def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[-1])  # step_000123



def reply_examples(tokenizer, pairs: list[tuple[list[dict], str]]) -> list[tuple[list[int], list[int]]]:
    """(agent prompt messages, reply text) -> (prompt ids, label ids): the label is the reply + EOS, the tokens the
    loss covers (common.pack_batch masks the prompt out)."""
    return [(common.chat_ids(tokenizer, m), tokenizer(reply, add_special_tokens=False)["input_ids"]
             + [tokenizer.eos_token_id]) for m, reply in pairs]


def agent_examples(tokenizer, path: str, history: int) -> list[tuple[list[int], list[int]]]:
    """The agent examples of an episodes.jsonl (rollout.agent_examples): imitation learning on expert episodes."""
    pairs = [ex for e in common.read_jsonl(path, ("env", "instruction", "steps"))
             for ex in rollout.agent_examples(e, history)]
    if not pairs:
        raise SystemExit(f"--agent-episodes {path}: no valid steps")
    return reply_examples(tokenizer, pairs)


# ----------------------------------------------------------------------------------------------------------
# Self-reflection (Early Experience): rationales for the expert action, generated by the starting model

def reflection_states(path: str) -> list[dict]:
    """Alternative-action triples grouped by expert state -> [{"id" (task#rollout#t), "triple" (the first
    alternative's, for the state), "expert_action", "expert_outcome", "alternatives": [(action, next state)]}]."""
    rows = common.read_jsonl(path, common.TRIPLE_KEYS + ("meta",))
    states: dict[str, dict] = {}
    for n, t in enumerate(rows, 1):
        meta = t["meta"]
        if "expert_action" not in meta:
            raise common.DataError(f"{path}:{n}: no meta.expert_action: not an alternative-action triple "
                                   "(collect.py --alternatives writes them to triples_alt.jsonl)")
        key = f"{t['task_id']}#{meta['rollout']}#{meta['t']}"
        state = states.setdefault(key, {"id": key, "triple": t, "expert_action": meta["expert_action"],
                                        "expert_outcome": meta["expert_next_state"], "alternatives": []})
        state["alternatives"].append((t["action"], t["next_state"]))
    if not states:
        raise SystemExit(f"--reflections {path}: no alternative-action triples")
    return list(states.values())


def shard_todo(d: common.Dist, items: list[dict], parts: Path) -> tuple[set, list[dict]]:
    """Resumable per-rank output in parts/rank{r}.jsonl: -> (ids already written by any rank, this rank's shard
    items[rank::world] still to do). The main rank repairs torn last lines of a killed run first."""
    parts.mkdir(parents=True, exist_ok=True)
    if d.main:  # once, before any rank reads
        for p in sorted(parts.glob("rank*.jsonl")):
            common.read_jsonl_resumable(p)
    if d.world > 1:
        dist.barrier()
    done = {r["id"] for p in sorted(parts.glob("rank*.jsonl")) for r in common.read_jsonl(p)}
    return done, [x for x in items[d.rank::d.world] if x["id"] not in done]


def rationales(s: Settings, d: common.Dist, states: list[dict], parts: Path) -> dict[str, str]:
    """{state id: raw rationale} of --model for every state; each rank writes its shard into
    parts/rank{r}.jsonl chunk by chunk (a rerun skips what is there), then every rank reads them all."""
    done, todo = shard_todo(d, states, parts)
    if todo:
        common.print0(f"SR: writing rationales for {len(states) - len(done)} expert states with {s.model}")
        model, tok = common.load_model(s.model, dtype=common.compute_dtype(s.precision, d.device), device=d.device)
        for c0 in tqdm(range(0, len(todo), s.gen_batch_size), desc="rationales", disable=not d.main):
            chunk = todo[c0:c0 + s.gen_batch_size]
            gen = torch.Generator(d.device).manual_seed(int(unit_hash("rationale", s.seed, chunk[0]["id"]) * 2**62))
            ids = [common.chat_ids(tok, prompts.reflection_messages(x["triple"], x["expert_action"],
                                                                    x["expert_outcome"], x["alternatives"]))
                   for x in chunk]
            samples = common.generate(model, tok, ids, s.max_new_tokens, s.temperature, batch_size=s.gen_batch_size,
                                      generator=gen)
            common.append_jsonl(parts / f"rank{d.rank}.jsonl", [{"id": x["id"], "rationale": y.text,
                                                                 "finished": y.finished}
                                                                for x, y in zip(chunk, samples)])
        del model
    if d.world > 1:
        dist.barrier()
    return {r["id"]: r["rationale"] for p in sorted(parts.glob("rank*.jsonl")) for r in common.read_jsonl(p)}


def reflection_examples(s: Settings, d: common.Dist, tokenizer, out_dir: Path,
                        log: common.MetricsLogger) -> list[tuple[list[int], list[int]]]:
    """SR examples: the agent's prompt at the expert state -> the rationale (cleaned: prompts.clean_rationale) as
    the thought, then the expert action. A state whose rationale comes out empty gives no example."""
    states = reflection_states(s.reflections)
    written = rationales(s, d, states, out_dir / "rationales")
    pairs = []
    for x in states:
        t, thought = x["triple"], prompts.clean_rationale(written[x["id"]])
        if thought:
            meta = t["meta"]
            pairs.append((prompts.agent_messages(t["instruction"], t["history"], t["state"], meta.get("admissible"),
                                                 meta["t"], t["env"]),
                          prompts.format_reply(x["expert_action"], thought)))
    log.log({"stage": "reflections", "states": len(states), "examples": len(pairs)})
    common.print0(f"SR: {len(pairs)} rationale examples from {len(states)} expert states "
                  f"({len(states) - len(pairs)} empty rationales dropped)")
    return reply_examples(tokenizer, pairs)


def sft(s: Settings, d: common.Dist, triples: list[dict], ckpt_root: Path, log: common.MetricsLogger) -> Path:
    """Train, resuming from ckpt_root's latest checkpoint; -> the final checkpoint dir (on every rank).
    The examples: the triples' WM SFT pairs, then --agent-episodes' agent pairs, then --reflections' SR pairs."""
    if s.batch_size % (s.micro_batch * d.world):
        raise ValueError(f"--batch-size {s.batch_size} must be a multiple of --micro-batch {s.micro_batch} "
                         f"x {d.world} rank(s)")
    tok = common.load_tokenizer(s.model)
    examples = sft_examples(tok, triples, s.truncate_prompt_tokens, s.sft_prompt)
    if s.agent_episodes:
        examples += agent_examples(tok, s.agent_episodes, s.history)
    if s.reflections:
        examples += reflection_examples(s, d, tok, ckpt_root.parent, log)
    if s.epochs and len(examples) < s.batch_size:
        raise ValueError(f"{len(examples)} SFT examples, fewer than --batch-size {s.batch_size}")
    steps_per_epoch = len(examples) // s.batch_size  # the last partial batch of each epoch is dropped
    lengths = [len(p) + len(label) for p, label in examples]
    total = steps_per_epoch * s.epochs
    if s.max_steps:
        total = min(total, s.max_steps)
    last = common.latest_checkpoint(ckpt_root)
    if last is not None and checkpoint_step(last) >= total:
        common.print0(f"SFT already done: {last}")
        return last

    # fp32 master weights (in bf16 an lr-2e-6 AdamW update is below the rounding step of most weights); forward and
    # backward in the --precision dtype (common.wrap_for_training: one recipe for one process and FSDP2)
    lm, _ = common.load_model(s.model, dtype=torch.float32, device=d.device)
    lm_logprobs = common.wrap_for_training(lm, d, common.compute_dtype(s.precision, d.device))
    opt = torch.optim.AdamW(lm.parameters(), lr=s.lr, weight_decay=0.0)   # the fp32 master weights
    common.sync_after_steps(opt, lm_logprobs.lm, lm)
    start = common.load_checkpoint(last, lm, opt)["step"] if last is not None else 0
    if start:
        common.print0(f"resuming SFT from {last} (step {start}/{total})")

    for step in tqdm(range(start, total), desc="sft", initial=start, total=total, disable=not d.main):
        t0 = time.time()
        epoch, b = divmod(step, steps_per_epoch)
        if b == 0 or step == start:   # once per epoch: batches of similar lengths
            order = common.length_grouped_order(lengths, s.batch_size, s.seed, epoch)
        batch = order[b * s.batch_size:(b + 1) * s.batch_size]
        n_tokens = sum(len(examples[i][1]) for i in batch)  # label tokens in the global batch
        mine = batch[d.rank::d.world]
        nll = torch.zeros((), device=d.device)
        for m0 in range(0, len(mine), s.micro_batch):
            ps, ls = zip(*(examples[i] for i in mine[m0:m0 + s.micro_batch]))
            ids, attn, mask = common.pack_batch(list(ps), list(ls), tok.pad_token_id, d.device)
            logp, _ = lm_logprobs(ids, attn, mask)
            # mean NLL over the global batch's label tokens; FSDP averages gradients over ranks, so x world
            (-logp.sum() * d.world / n_tokens).backward()
            nll += -logp.detach().sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(lm.parameters(), s.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if d.world > 1:
            dist.all_reduce(nll)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        log.log({"stage": "sft", "step": step, "epoch": epoch, "loss": nll.item() / n_tokens,
                 "grad_norm": grad_norm.item(), "label_tokens": n_tokens, "step_s": round(time.time() - t0, 3)})
        if (step + 1) % s.save_every == 0 and step + 1 < total:
            common.save_checkpoint(ckpt_root, step + 1, lm, tok, opt)
    common.save_checkpoint(ckpt_root, total, lm, tok, opt)
    final = common.latest_checkpoint(ckpt_root)
    common.print0(f"SFT checkpoint: {final}")
    return final


# ----------------------------------------------------------------------------------------------------------
# Stage 2: K predictions per training triple, hits at the strict threshold

def score(s: Settings, d: common.Dist, model_path: Path, triples: list[dict], parts: Path,
          log: common.MetricsLogger) -> None:
    """Each rank scores its shard (triples[rank::world]) into parts/rank{r}.jsonl, skipping scored ids."""
    from rewards import WorldModelReward, binarize
    done, todo = shard_todo(d, triples, parts)
    common.print0(f"scoring {len(triples) - len(done)} triples ({len(done)} already scored) on {d.world} rank(s)")
    if not todo:
        return
    model, tok = common.load_model(str(model_path), dtype=common.compute_dtype(s.precision, d.device), device=d.device)
    # mode "score": each prediction's cosine (snapped ROUGE-L for tool replies), thresholded here and in merge()
    reward = WorldModelReward(s.embedder, max_tokens=s.reward_max_tokens, mode="score",
                              embed_instruction=s.embed_instruction, device=str(d.device))
    prompt_ids = wm_prompts(tok, todo, s.truncate_prompt_tokens, s.sft_prompt)
    out = parts / f"rank{d.rank}.jsonl"
    n_scored = n_easy = 0
    chunks = range(0, len(todo), s.triples_per_chunk)
    for c0 in tqdm(chunks, desc=f"score rank {d.rank}", disable=not d.main):
        t0 = time.time()
        chunk = todo[c0:c0 + s.triples_per_chunk]
        # seeded by the chunk's first id: a resumed run redraws exactly the samples the killed one would have
        gen = torch.Generator(d.device).manual_seed(int(unit_hash("sample", s.seed, chunk[0]["id"]) * 2**62))
        ids = prompt_ids[c0:c0 + s.triples_per_chunk]
        samples = common.generate(model, tok, [p for p in ids for _ in range(s.k)], s.max_new_tokens,
                                  s.temperature, batch_size=s.gen_batch_size, generator=gen)
        repeated = [t for t in chunk for _ in range(s.k)]   # each triple K times, in the samples' order
        scores = reward([x.text for x in samples], repeated)   # [chunk * K]
        # a hit is a full reward at the strict thresholds (binary 1.0, or snapped ROUGE-L 1.0 for τ² tool replies)
        hits = (binarize(scores, [t["next_kind"] for t in repeated], s.tau_d, s.tau_d_user) >= 1.0) \
            .view(len(chunk), s.k).sum(1).tolist()
        scores = scores.view(len(chunk), s.k)
        best = (scores.argmax(1) + torch.arange(len(chunk)) * s.k).tolist()  # for reading what the filter predicts
        common.append_jsonl(out, [{"id": t["id"], "easy_hits": h, "similarity": sc, "best_prediction": samples[b].text}
                                  for t, h, sc, b in zip(chunk, hits, scores.tolist(), best)])
        n_scored += len(chunk)
        n_easy += sum(h >= s.min_hits for h in hits)
        log.log({"stage": "score", "rank": d.rank, "scored": n_scored, "easy_frac": n_easy / n_scored,
                 "mean_response_tokens": sum(len(x.response_ids) for x in samples) / len(samples),
                 "cut_frac": sum(not x.finished for x in samples) / len(samples),  # hit --max-new-tokens
                 "predictions_per_s": round(len(samples) / (time.time() - t0), 2)})


def fractions(rows: list[dict]) -> dict:
    n = len(rows)
    easy, hard, kept = (sum(r[key] for r in rows) for key in ("easy", "too_hard", "kept"))
    return {"triples": n, "easy": easy, "too_hard": hard, "kept": kept, "easy_frac": easy / n if n else 0.0,
            "too_hard_frac": hard / n if n else 0.0, "kept_frac": kept / n if n else 0.0}


def too_hard(s: Settings, row: dict, kind: str, path: Path) -> bool:
    """--hard-tau-d: none of the triple's K predictions (its scored row) earns a training reward above 0."""
    if not s.hard_tau_d:
        return False
    from rewards import binarize   # only with the rule on: a resumed merge need not load the embedder's stack
    if "similarity" not in row:
        raise RuntimeError(f"{path}: triple {row['id']!r} was scored without its similarities (by an older "
                           f"filter.py); --hard-tau-d needs them: delete {path.parent} to score again")
    sims = torch.tensor(row["similarity"])
    return not binarize(sims, [kind] * len(sims), s.hard_tau_d, s.hard_tau_d_user).gt(0).any().item()


def fractions_by(rows: list[dict], key: str) -> dict:
    return {v: fractions([r for r in rows if r[key] == v]) for v in sorted({r[key] for r in rows})}


def merge(s: Settings, triples: list[dict], parts: Path, out_dir: Path, model_path: Path) -> dict:
    """filtered.jsonl in the training file's order, and summary.json; -> the summary."""
    scored = {r["id"]: (r, p) for p in sorted(parts.glob("rank*.jsonl")) for r in common.read_jsonl(p)}
    rows = []
    for t in triples:
        if not s.k:   # the rule is off: nothing was scored, every triple is kept
            rows.append({**t, "easy_hits": 0, "too_hard": False, "easy": False, "kept": True})
            continue
        if t["id"] not in scored:
            raise RuntimeError(f"{parts}: triple {t['id']!r} was never scored (a rank died?); rerun to finish it")
        row, path = scored[t["id"]]
        hard = too_hard(s, row, t["next_kind"], path)
        easy, kept = mark(t["id"], row["easy_hits"], s.keep_p, s.seed, s.min_hits, hard)
        rows.append({**t, "easy_hits": row["easy_hits"], "too_hard": hard, "easy": easy, "kept": kept})
    common.write_jsonl(out_dir / "filtered.jsonl", rows)
    summary = {**fractions(rows), "by_env": fractions_by(rows, "env"), "by_next_kind": fractions_by(rows, "next_kind"),
               "filter_model": str(model_path), "k": s.k, "tau_d": s.tau_d, "tau_d_user": s.tau_d_user,
               "min_hits": s.min_hits, "keep_p": s.keep_p, "hard_tau_d": s.hard_tau_d,
               "hard_tau_d_user": s.hard_tau_d_user, "seed": s.seed}
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out_dir / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> dict | Path:
    s = common.parse_settings(Settings, argv)
    d = common.init_distributed()
    common.seed_everything(s.seed)
    out_dir = Path(s.out_dir)
    if d.main:
        common.save_config(s, out_dir)
    log = common.MetricsLogger(out_dir / "metrics.jsonl", enabled=d.main)
    ckpt_root = out_dir / "ckpt"
    if s.sft_only:
        if not (s.triples or s.agent_episodes or s.reflections):
            raise SystemExit("--sft-only with --triples '' needs --agent-episodes or --reflections: nothing to train")
        return sft(s, d, load_triples(s.triples) if s.triples else [], ckpt_root, log)
    if not s.triples:
        raise SystemExit("the filter scores --triples: give a triples file (or --sft-only to train without one)")
    train = load_triples(s.triples)  # read before the SFT: a bad file fails fast
    model_path = sft(s, d, load_triples(s.val_triples), ckpt_root, log)
    parts = out_dir / "scored"
    if s.k:
        score(s, d, model_path, train, parts, log)
    if d.world > 1:
        dist.barrier()
    if not d.main:
        return model_path
    summary = merge(s, train, parts, out_dir, model_path)
    common.print0(f"easy {summary['easy']}/{summary['triples']} ({summary['easy_frac']:.1%}), kept "
                  f"{summary['kept']} ({summary['kept_frac']:.1%}) -> {out_dir / 'filtered.jsonl'}")
    return summary


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
