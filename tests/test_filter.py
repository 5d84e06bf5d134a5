"""filter.py: WM SFT learns, the easy/keep rule, and the filter's output (valid, reproducible, resumable)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import filter as filt
import prompts

ROOT = Path(__file__).resolve().parent.parent
PUT_MUG = "put a clean mug in coffeemachine."
HEAT_EGG = "heat some egg and put it in garbagecan."
KITCHEN = ("You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a coffeemachine 1, "
           "a countertop 1, a fridge 1, a garbagecan 1, a microwave 1, and a sinkbasin 1.")
# (instruction, state, action, next state): ALFWorld-like transitions, in episode order per task
STEPS = [
    (PUT_MUG, KITCHEN, "go to countertop 1",
     "You arrive at countertop 1. On the countertop 1, you see a mug 1, a knife 2, and a apple 1."),
    (PUT_MUG, "You arrive at countertop 1. On the countertop 1, you see a mug 1, a knife 2, and a apple 1.",
     "take mug 1 from countertop 1", "You pick up the mug 1 from the countertop 1."),
    (PUT_MUG, "You pick up the mug 1 from the countertop 1.", "go to sinkbasin 1",
     "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing."),
    (PUT_MUG, "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing.", "clean mug 1 with sinkbasin 1",
     "You clean the mug 1 using the sinkbasin 1."),
    (PUT_MUG, "You clean the mug 1 using the sinkbasin 1.", "go to coffeemachine 1",
     "You arrive at coffeemachine 1. On the coffeemachine 1, you see nothing."),
    (PUT_MUG, "You arrive at coffeemachine 1. On the coffeemachine 1, you see nothing.",
     "move mug 1 to coffeemachine 1", "You move the mug 1 to the coffeemachine 1."),
    (HEAT_EGG, KITCHEN, "go to fridge 1", "You arrive at fridge 1. The fridge 1 is closed."),
    (HEAT_EGG, "You arrive at fridge 1. The fridge 1 is closed.", "open fridge 1",
     "You open the fridge 1. The fridge 1 is open. In it, you see a egg 2, a lettuce 1, and a tomato 3."),
    (HEAT_EGG, "You open the fridge 1. The fridge 1 is open. In it, you see a egg 2, a lettuce 1, and a tomato 3.",
     "take egg 2 from fridge 1", "You pick up the egg 2 from the fridge 1."),
    (HEAT_EGG, "You pick up the egg 2 from the fridge 1.", "go to microwave 1",
     "You arrive at microwave 1. The microwave 1 is closed."),
    (HEAT_EGG, "You arrive at microwave 1. The microwave 1 is closed.", "heat egg 2 with microwave 1",
     "You heat the egg 2 using the microwave 1."),
    (HEAT_EGG, "You heat the egg 2 using the microwave 1.", "go to garbagecan 1",
     "You arrive at garbagecan 1. On the garbagecan 1, you see nothing."),
]
# The tiny model cannot close a <next_state> block in a few tokens, so every prediction reads "none" (paper:
# missing tag -> "none"): triples whose true next state is "none" are hit by all K samples, the others by none.
EASY_IDS = {"t-3", "t-9"}


def triples(prefix: str, steps=STEPS) -> list[dict]:
    rows, history = [], []
    for n, (instr, state, action, nxt) in enumerate(steps):
        if n and instr != steps[n - 1][0]:
            history = []
        rows.append({"id": f"{prefix}-{n}", "env": "alfworld", "task_id": instr, "instruction": instr,
                     "history": history[-2:], "state": state, "action": action,
                     "next_state": "none" if f"{prefix}-{n}" in EASY_IDS else nxt, "next_kind": "obs", "meta": {}})
        history = history + [{"obs": state, "action": action}]
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("triples")
    common.write_jsonl(d / "train.jsonl", triples("t"))
    common.write_jsonl(d / "val.jsonl", triples("v")[:8])
    return d


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--triples", str(data / "train.jsonl"), "--val-triples", str(data / "val.jsonl"),
            "--out-dir", str(out), "--lr", "3e-3", "--batch-size", "4", "--micro-batch", "2", "--epochs", "1",
            "--k", "3", "--max-new-tokens", "6", "--triples-per-chunk", "4", "--gen-batch-size", "12", *extra]


def metrics(out: Path, stage: str) -> list[dict]:
    return [r for r in common.read_jsonl(out / "metrics.jsonl") if r["stage"] == stage]


# ----------------------------------------------------------------------------------------------------------
# The rule, on crafted hit counts

def test_no_hit_is_never_easy_and_always_kept():
    for i in range(500):
        assert filt.mark(f"id{i}", 0, keep_p=0.1, seed=i % 7) == (False, True)
        assert filt.mark(f"id{i}", 0, keep_p=0.0, seed=0) == (False, True)


def test_hits_make_easy_and_easy_is_kept_with_probability_p():
    n = 20_000
    for p in (0.1, 0.5):
        kept = [filt.mark(f"alfworld-{i}", hits=1 + i % 10, keep_p=p, seed=3) for i in range(n)]
        assert all(easy for easy, _ in kept)
        frac = sum(k for _, k in kept) / n
        assert abs(frac - p) < 4 * (p * (1 - p) / n) ** 0.5, frac  # 4 sigma of a binomial
    assert all(filt.mark(f"x{i}", 5, keep_p=0.0, seed=0) == (True, False) for i in range(200))
    assert all(filt.mark(f"x{i}", 5, keep_p=1.0, seed=0) == (True, True) for i in range(200))


def test_min_hits_threshold():
    assert filt.mark("a", 1, keep_p=0.0, seed=0, min_hits=2) == (False, True)
    assert filt.mark("a", 2, keep_p=0.0, seed=0, min_hits=2) == (True, False)


def test_keep_coin_is_deterministic_per_id_and_seed():
    ids = [f"t{i}" for i in range(2000)]
    first = [filt.mark(i, 3, 0.1, seed=0)[1] for i in ids]
    assert first == [filt.mark(i, 3, 0.1, seed=0)[1] for i in ids]
    assert first != [filt.mark(i, 3, 0.1, seed=1)[1] for i in ids]
    # the coin depends on the id, not on how many hits made it easy
    assert first == [filt.mark(i, 10, 0.1, seed=0)[1] for i in ids]


# ----------------------------------------------------------------------------------------------------------
# Stage 1: WM SFT

def test_sft_loss_falls_and_checkpoint_loads(data, tmp_path):
    out = tmp_path / "sft"
    ckpt = filt.main(flags(data, out, "--sft-only", "--epochs", "4", "--lr", "3e-2"))
    losses = [r["loss"] for r in metrics(out, "sft")]
    assert len(losses) == 4 * (12 // 4)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert ckpt == common.latest_checkpoint(out / "ckpt") and ckpt.name == "step_000012"
    assert json.loads((out / "config.json").read_text())["sft_only"] is True

    # the checkpoint is a plain model dir, and it learned the label format
    model, tok = common.load_model(str(ckpt))
    prompt_ids, label_ids = zip(*filt.sft_examples(tok, triples("t")[:4], 1500))

    def nll(m) -> float:
        return -torch.cat(common.sequence_logprobs(m, prompt_ids, label_ids, pad_id=tok.pad_token_id)).mean().item()
    assert nll(model) < 0.7 * nll(common.load_model("tiny")[0])


def test_sft_label_is_target_plus_eos_and_long_prompts_are_left_truncated():
    tok = common.load_tokenizer("tiny")
    t = triples("t")[1]
    (prompt, label), = filt.sft_examples(tok, [t], 1500)
    assert tok.decode(label) == f"<think> </think>\n<next_state> {t['next_state']} </next_state>{tok.eos_token}"
    (short, _), = filt.sft_examples(tok, [t], 50)
    assert short == prompt[-50:]


def test_sft_and_filter_prompts_are_the_paper_wm_sft_prompt_by_default():
    tok = common.load_tokenizer("tiny")
    t = triples("t")[1]
    (prompt, _), = filt.sft_examples(tok, [t], 1500)
    assert prompt == common.chat_ids(tok, prompts.wm_messages(t, "sft")) == filt.wm_prompts(tok, [t], 1500)[0]
    (rwml, _), = filt.sft_examples(tok, [t], 1500, sft_prompt="rwml")
    assert rwml == common.chat_ids(tok, prompts.wm_messages(t, "rwml")) != prompt


def test_sft_resumes_exactly(data, tmp_path):
    """A run stopped after epoch 1 and continued to epoch 2 ends with the weights of an uninterrupted run."""
    a, b = tmp_path / "a", tmp_path / "b"
    filt.main(flags(data, a, "--sft-only", "--epochs", "1"))
    filt.main(flags(data, a, "--sft-only", "--epochs", "2", "--save-every", "2"))
    filt.main(flags(data, b, "--sft-only", "--epochs", "2"))
    assert [r["step"] for r in metrics(a, "sft")] == list(range(6))
    wa, _ = common.load_model(str(common.latest_checkpoint(a / "ckpt")))
    wb, _ = common.load_model(str(common.latest_checkpoint(b / "ckpt")))
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_bad_input_names_the_problem(data, tmp_path):
    rows = triples("t")
    common.write_jsonl(tmp_path / "dup.jsonl", rows + rows[:1])
    with pytest.raises(common.DataError, match="duplicate triple id 't-0'"):
        filt.load_triples(tmp_path / "dup.jsonl")
    del rows[2]["next_state"]
    common.write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(common.DataError, match=r"bad.jsonl:3: missing key\(s\) \['next_state'\]"):
        filt.load_triples(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="--batch-size 6 must be a multiple of --micro-batch 4"):
        filt.main(flags(data, tmp_path / "o", "--batch-size", "6", "--micro-batch", "4"))


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the filter end to end

@pytest.fixture(scope="module")
def filtered(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("filter")
    filt.main(flags(data, out, "--keep-p", "0.5"))
    return out


def test_filtered_jsonl_is_valid(filtered, data):
    rows = common.read_jsonl(filtered / "filtered.jsonl", common.TRIPLE_KEYS + ("easy_hits", "easy", "kept"))
    train = common.read_jsonl(data / "train.jsonl")
    assert [r["id"] for r in rows] == [t["id"] for t in train]
    for r, t in zip(rows, train):
        assert {k: r[k] for k in t} == t  # the triple itself is untouched
        assert r["easy_hits"] == (3 if r["id"] in EASY_IDS else 0)
        assert (r["easy"], r["kept"]) == filt.mark(r["id"], r["easy_hits"], 0.5, 0)
    summary = json.loads((filtered / "summary.json").read_text())
    assert summary["easy"] == 2 and summary["triples"] == 12
    assert summary["kept"] == sum(r["kept"] for r in rows) and summary["easy_frac"] == pytest.approx(2 / 12)
    assert summary["by_env"]["alfworld"]["easy"] == 2 and summary["by_next_kind"]["obs"]["triples"] == 12
    assert [r["step"] for r in metrics(filtered, "sft")] == [0, 1]  # 8 val triples, batch 4, 1 epoch


def test_filter_is_reproducible_and_resumes_without_duplicates(filtered, data, tmp_path):
    again = tmp_path / "again"
    filt.main(flags(data, again, "--keep-p", "0.5"))
    assert (again / "filtered.jsonl").read_bytes() == (filtered / "filtered.jsonl").read_bytes()
    part = again / "scored" / "rank0.jsonl"
    assert part.read_text() == (filtered / "scored" / "rank0.jsonl").read_text()  # the K samples' scores too

    # kill mid-run: the first chunk survives plus a torn line; the rerun skips the SFT and the first chunk
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][:10])
    (again / "filtered.jsonl").unlink()
    n_metrics = len(common.read_jsonl(again / "metrics.jsonl"))
    filt.main(flags(data, again, "--keep-p", "0.5"))
    ids = [r["id"] for r in common.read_jsonl(part)]
    assert len(ids) == len(set(ids)) == 12
    assert part.read_text() == (filtered / "scored" / "rank0.jsonl").read_text()
    assert (again / "filtered.jsonl").read_bytes() == (filtered / "filtered.jsonl").read_bytes()
    new = common.read_jsonl(again / "metrics.jsonl")[n_metrics:]
    assert [r["stage"] for r in new] == ["score", "score"]  # 8 triples left, 4 per chunk; no SFT step


@pytest.mark.slow
def test_torchrun_two_ranks_match_one(filtered, data, tmp_path):
    """FSDP2 SFT + sharded scoring on 2 CPU ranks (gloo); hits here do not depend on the sampled text."""
    out = tmp_path / "tr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "filter.py"), *flags(data, out, "--keep-p", "0.5")]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, timeout=300)
    assert sorted(p.name for p in (out / "scored").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    assert (out / "filtered.jsonl").read_bytes() == (filtered / "filtered.jsonl").read_bytes()
    # the same global batches: FSDP2's averaged gradients equal the single process's, so the SFT ends the same
    for key in ("loss", "grad_norm"):  # a missing x world would halve the gradient
        one_rank = [r[key] for r in metrics(filtered, "sft")]
        assert [r[key] for r in metrics(out, "sft")] == pytest.approx(one_rank, rel=1e-4)
    two, _ = common.load_model(str(common.latest_checkpoint(out / "ckpt")))
    one, _ = common.load_model(str(common.latest_checkpoint(filtered / "ckpt")))
    for (name, x), y in zip(two.state_dict().items(), one.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def test_format_episodes_add_agent_format_examples_that_carry_only_the_action_taken(data, tmp_path):
    import collect
    from prompts import parse_action
    # random admissible actions on TextWorld-Express, no model: the cold start's format-only data
    play = collect.Settings(env="twx", split="train", model="none", n_tasks=3, rollouts=1, max_env_steps=3, explore=1.0,
                            out_dir=str(tmp_path / "twx"))
    collect.main(play)
    episodes = common.read_jsonl(tmp_path / "twx" / "episodes.jsonl")
    _, tok = common.load_model("tiny")
    examples = filt.format_examples(tok, str(tmp_path / "twx" / "episodes.jsonl"))
    steps = [st for e in episodes for st in e["steps"]]
    assert len(examples) == len(steps) == 9
    for (prompt_ids, label_ids), step in zip(examples, steps):
        prompt = tok.decode(prompt_ids)
        assert step["obs"] in prompt and all(a in prompt for a in step["admissible"])
        reply = tok.decode(label_ids, skip_special_tokens=True)
        assert parse_action(reply, step["admissible"]) == (step["action"], True)
        assert label_ids[-1] == tok.eos_token_id
    out = tmp_path / "sft"
    filt.main(flags(data, out, "--sft-only", "--format-episodes", str(tmp_path / "twx" / "episodes.jsonl")))
    assert len(metrics(out, "sft")) == (12 + 9) // 4   # the WM triples and the agent examples together


def test_sft_in_bf16_trains_the_fp32_master_weights(data, tmp_path):
    """--precision bf16: forward/backward on a bf16 copy, AdamW on fp32 master weights that the checkpoint holds;
    the copy follows every step (else the loss could not keep falling)."""
    out = tmp_path / "bf16"
    ckpt = filt.main(flags(data, out, "--sft-only", "--epochs", "4", "--lr", "3e-2", "--precision", "bf16"))
    losses = [r["loss"] for r in metrics(out, "sft")]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    tuned, _ = common.load_model(str(ckpt), dtype=torch.float32)
    start, _ = common.load_model("tiny", dtype=torch.float32)
    moved = [float((a - b).abs().max()) for a, b in zip(tuned.parameters(), start.parameters())]
    # updates far below bf16's rounding step of the weights still land: the master weights are fp32
    assert all(m > 0 for m in moved) and any(0 < (a - b).abs().min() < 1e-4 for a, b in
                                            zip(tuned.parameters(), start.parameters()) if a.dim() == 2)
