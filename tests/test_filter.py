"""filter.py: WM SFT learns, the easy/keep rule, and the filter's output (valid, reproducible, resumable)."""
import json
import os
import shutil
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
# ... and a triple whose next state is "None, none." (MiniLM cosine to "none": 0.84) earns the training reward
# (tau_d 0.2) but no strict hit (0.1): the only triple that --hard-tau-d 0.2 keeps besides the easy ones
NEAR_IDS = {"t-5"}


def triples(prefix: str, steps=STEPS) -> list[dict]:
    rows, history = [], []
    for n, (instr, state, action, nxt) in enumerate(steps):
        if n and instr != steps[n - 1][0]:
            history = []
        rows.append({"id": f"{prefix}-{n}", "env": "alfworld", "task_id": instr, "instruction": instr,
                     "history": history[-2:], "state": state, "action": action,
                     "next_state": "none" if f"{prefix}-{n}" in EASY_IDS else
                                   "None, none." if f"{prefix}-{n}" in NEAR_IDS else nxt,
                     "next_kind": "obs", "meta": {}})
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


def test_too_hard_is_never_kept():
    assert all(filt.mark(f"x{i}", 0, keep_p=1.0, seed=0, too_hard=True) == (False, False) for i in range(200))
    assert all(not filt.mark(f"x{i}", 2, keep_p=1.0, seed=0, too_hard=True)[1] for i in range(200))


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
    c = tmp_path / "c"   # --max-steps: the first steps of the same run, then the checkpoint
    filt.main(flags(data, c, "--sft-only", "--epochs", "2", "--max-steps", "4"))
    assert [r["step"] for r in metrics(c, "sft")] == list(range(4))
    assert common.latest_checkpoint(c / "ckpt").name == "step_000004"
    assert [r["loss"] for r in metrics(c, "sft")] == [r["loss"] for r in metrics(b, "sft")][:4]
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


def test_hard_tau_d_drops_the_triples_no_prediction_earns_a_reward_for(filtered, data, tmp_path):
    """--hard-tau-d 0.2 on the scored samples of `filtered`: the easy triples (strict hits) and the near one
    (reward at 0.2, no strict hit) stay as before; every other triple, all 0 at 0.2, is too hard and dropped."""
    out = tmp_path / "hard"
    shutil.copytree(filtered, out)
    (out / "filtered.jsonl").unlink()
    summary = filt.main(flags(data, out, "--keep-p", "0.5", "--hard-tau-d", "0.2"))
    before = {r["id"]: r for r in common.read_jsonl(filtered / "filtered.jsonl")}
    rows = common.read_jsonl(out / "filtered.jsonl")
    for r in rows:
        assert r["too_hard"] == (r["id"] not in EASY_IDS | NEAR_IDS) and not before[r["id"]]["too_hard"]
        assert (r["easy"], r["kept"]) == ((before[r["id"]]["easy"], before[r["id"]]["kept"]) if not r["too_hard"]
                                          else (False, False))
    assert summary["too_hard"] == 9 and summary["kept"] == 1 + sum(before[i]["kept"] for i in EASY_IDS)
    assert [r["id"] for r in filt.load_triples(out / "filtered.jsonl")] == [r["id"] for r in rows if r["kept"]]
    # parts scored without the similarities (an older filter.py) cannot say what is too hard: a clear error
    part = out / "scored" / "rank0.jsonl"
    common.write_jsonl(part, [{k: v for k, v in r.items() if k != "similarity"} for r in common.read_jsonl(part)])
    with pytest.raises(RuntimeError, match=r"rank0.jsonl: triple 't-0' was scored without its similarities"):
        filt.main(flags(data, out, "--keep-p", "0.5", "--hard-tau-d", "0.2"))


def test_k_zero_trains_the_filter_model_and_keeps_every_triple_unscored(data, tmp_path):
    """--k 0 (the miniature's setting): the SFT still runs (the filter model is the cold start), nothing is
    sampled, every triple is kept as not easy."""
    out = tmp_path / "k0"
    summary = filt.main(flags(data, out, "--k", "0", "--min-hits", "0", "--keep-p", "0"))
    rows = common.read_jsonl(out / "filtered.jsonl")
    assert [r["id"] for r in rows] == [t["id"] for t in common.read_jsonl(data / "train.jsonl")]
    assert all(r["kept"] and not r["easy"] and r["easy_hits"] == 0 for r in rows)
    assert summary["kept"] == 12 and summary["k"] == 0 and not metrics(out, "score")
    assert [r["step"] for r in metrics(out, "sft")] == [0, 1] and common.latest_checkpoint(out / "ckpt")


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


def test_agent_episodes_add_agent_format_examples_that_carry_only_the_action_taken(data, tmp_path):
    import collect
    from prompts import parse_action
    # random admissible actions on TextWorld-Express, no model: the cold start's format-only data
    play = collect.Settings(env="twx", split="train", model="none", n_tasks=3, rollouts=1, max_env_steps=3, explore=1.0,
                            out_dir=str(tmp_path / "twx"))
    collect.main(play)
    episodes = common.read_jsonl(tmp_path / "twx" / "episodes.jsonl")
    _, tok = common.load_model("tiny")
    examples = filt.agent_examples(tok, str(tmp_path / "twx" / "episodes.jsonl"), history=2)
    steps = [st for e in episodes for st in e["steps"]]
    assert len(examples) == len(steps) == 9
    for (prompt_ids, label_ids), step in zip(examples, steps):
        prompt = tok.decode(prompt_ids)
        assert step["obs"] in prompt and all(a in prompt for a in step["admissible"])
        reply = tok.decode(label_ids, skip_special_tokens=True)
        assert parse_action(reply, step["admissible"]) == (step["action"], True)
        assert label_ids[-1] == tok.eos_token_id
    out = tmp_path / "sft"
    filt.main(flags(data, out, "--sft-only", "--agent-episodes", str(tmp_path / "twx" / "episodes.jsonl")))
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


# ----------------------------------------------------------------------------------------------------------
# Early Experience's baselines: imitation learning, IWM (WM SFT on alternatives, then IL), self-reflection

def expert_collect(tmp_path, name: str, split: str = "train", n_tasks: int = 6, alternatives: int = 0) -> Path:
    """Expert episodes (the gold path) on TextWorld-Express cookingworld, no model: -> the collect out_dir."""
    import collect
    s = collect.Settings(env="twx", split=split, task_type="cookingworld", model="none", n_tasks=n_tasks, rollouts=1,
                         max_env_steps=20, policy="expert", alternatives=alternatives, out_dir=str(tmp_path / name))
    assert collect.main(s)["success_rate"] == 1.0
    return tmp_path / name


def test_il_examples_are_the_agents_prompt_and_the_loss_covers_only_the_expert_reply():
    import rollout
    from envs import make_env
    seen = []

    def expert(messages_list, infos):  # the gold action, recording the prompt the agent was given
        seen.extend(messages_list)
        return [common.Sample([], [], prompts.format_reply(i["gold"]), [], True) for i in infos]

    suite = make_env("twx", "train", games=("cookingworld",))
    episodes = rollout.run_episodes(expert, suite, [(t, 0) for t in suite.task_ids[:2]], env="twx", split="train",
                                    batch_size=1, history=2)
    tok = common.load_tokenizer("tiny")
    pairs = [ex for e in episodes for ex in rollout.agent_examples(rollout.strip_samples(e), history=2)]
    assert [m for m, _ in pairs] == seen  # the prompt the agent saw at every expert state
    prompt_ids, label_ids = map(list, zip(*filt.reply_examples(tok, pairs)))
    ids, attn, mask = common.pack_batch(prompt_ids, label_ids, tok.pad_token_id)
    steps = [st for e in episodes for st in e["steps"]]
    for b, step in enumerate(steps):
        assert ids[b][mask[b]].tolist() == label_ids[b]     # the loss: the expert's reply + EOS, nothing else
        assert tok.decode(label_ids[b]) == f"<think> </think>\n<action> {step['action']} </action>{tok.eos_token}"
        assert ids[b][attn[b].bool() & ~mask[b]].tolist() == prompt_ids[b] == common.chat_ids(tok, seen[b])
        assert mask[b].nonzero()[0].item() == len(prompt_ids[b])


@pytest.mark.slow  # ~25 s on an idle 2-core box (two collects, 20 SFT steps, 176 sequences scored twice)
def test_il_lowers_the_nll_of_expert_actions_on_held_out_states(tmp_path):
    """A few IL steps on expert episodes of some games make the expert's action more likely on other games' states,
    and more likely than the other admissible actions there (per-token NLL of the action's own words). Training on
    random admissible actions (the cold start's format data) or on one fixed action lowers NLL too, by token
    frequency alone, but does not put the expert's action ahead: hence the margin."""
    import random
    import rollout
    train = expert_collect(tmp_path, "train", n_tasks=8)
    held = expert_collect(tmp_path, "held", split="dev", n_tasks=4)
    tok = common.load_tokenizer("tiny")
    rng = random.Random(0)
    expert_rows, other_rows = [], []   # (prompt ids, label ids): the expert's reply; 3 other admissible replies
    for e in common.read_jsonl(held / "episodes.jsonl"):
        for t, step in enumerate(e["steps"]):
            others = rng.sample([a for a in step["admissible"] if a != step["action"]], 3)
            pairs = filt.reply_examples(tok, [(rollout.step_messages(e, t, 2), prompts.format_reply(a))
                                              for a in [step["action"], *others]])
            expert_rows.append(pairs[0])
            other_rows += pairs[1:]
    n_prefix = len(tok("<think> </think>\n<action>", add_special_tokens=False)["input_ids"])

    def action_nll(model, rows) -> float:  # the action's words: the reply minus its format tokens and EOS
        logp = common.sequence_logprobs(model, *map(list, zip(*rows)), pad_id=tok.pad_token_id)
        return sum(-x[n_prefix:-4].mean().item() for x in logp) / len(logp)

    out = tmp_path / "il"
    ckpt = filt.main(["--sft-only", "--triples", "", "--agent-episodes", str(train / "episodes.jsonl"), "--model",
                      "tiny", "--lr", "3e-3", "--batch-size", "4", "--micro-batch", "4", "--epochs", "2",
                      "--out-dir", str(out)])
    start, tuned = common.load_model("tiny")[0], common.load_model(str(ckpt))[0]
    before, after = action_nll(start, expert_rows), action_nll(tuned, expert_rows)
    margin_before = action_nll(start, other_rows) - before
    margin_after = action_nll(tuned, other_rows) - after
    # measured: expert 10.80 -> 7.15 nats/token, margin -0.01 -> 1.46; trained on random admissible actions instead
    # the margin fell to about -0.6, on "look around" alone it rose to about 0.2
    assert after < 0.8 * before and margin_before < 0.1 and margin_after > 0.7, (before, after, margin_after)
    n_train = len(filt.agent_examples(tok, str(train / "episodes.jsonl"), history=2))
    assert len(metrics(out, "sft")) == 2 * (n_train // 4)   # the agent examples alone: no world-model triple


def alternative_rows() -> list[dict]:
    """Two expert states of one ALFWorld-like episode, two alternatives each (collect.py's triples_alt shape)."""
    rows = []
    for t, (state, expert, outcome) in enumerate([
            (KITCHEN, "go to countertop 1", STEPS[0][3]),
            (STEPS[0][3], "take mug 1 from countertop 1", STEPS[1][3])]):
        history = [] if t == 0 else [{"obs": KITCHEN, "action": "go to countertop 1"}]
        for j, (action, nxt) in enumerate([("go to fridge 1", "You arrive at fridge 1. The fridge 1 is closed."),
                                           ("inventory", "You are not carrying anything.")]):
            rows.append({"id": f"g#0#{t}#alt{j}", "env": "alfworld", "task_id": "g", "instruction": PUT_MUG,
                         "history": history, "state": state, "action": action, "next_state": nxt, "next_kind": "obs",
                         "meta": {"rollout": 0, "t": t, "alternative": j, "expert_action": expert,
                                  "expert_next_state": outcome,
                                  "admissible": ["go to countertop 1", "go to fridge 1", "inventory",
                                                 "take mug 1 from countertop 1"]}})
    return rows


def test_sr_examples_hold_the_rationale_then_the_expert_action(tmp_path, monkeypatch):
    path = tmp_path / "alt.jsonl"
    common.write_jsonl(path, alternative_rows())
    asked = []
    written = {"go to countertop 1": "The mug is on the countertop; the fridge holds no mug. </think><action>x",
               "take mug 1 from countertop 1": "<action>look</action>"}   # cleaned to nothing: no example

    def fake_generate(model, tok, prompt_ids, *a, **kw):
        texts = [tok.decode(p) for p in prompt_ids]
        asked.extend(texts)
        return [common.Sample(p, [], next(v for k, v in written.items() if f"The expert chose {k!r}" in text), [],
                              True) for p, text in zip(prompt_ids, texts)]

    monkeypatch.setattr(common, "generate", fake_generate)
    s = filt.Settings(model="tiny", reflections=str(path), sft_only=True)
    tok = common.load_tokenizer("tiny")
    log = common.MetricsLogger(tmp_path / "metrics.jsonl")
    (prompt, label), = filt.reflection_examples(s, common.init_distributed(), tok, tmp_path, log)
    assert tok.decode(label) == ("<think> The mug is on the countertop; the fridge holds no mug. </think>\n"
                                 f"<action> go to countertop 1 </action>{tok.eos_token}")
    row = alternative_rows()[0]
    assert prompt == common.chat_ids(tok, prompts.agent_messages(PUT_MUG, [], KITCHEN, row["meta"]["admissible"], 0,
                                                                 "alfworld"))
    # the rationale prompt shows every candidate with where it leads, the expert's first
    assert len(asked) == 2
    for action, outcome in [("go to countertop 1", STEPS[0][3]), ("go to fridge 1", "You arrive at fridge 1. The "
                            "fridge 1 is closed."), ("inventory", "You are not carrying anything.")]:
        assert f"Action {action!r} -> observation: {outcome!r}" in asked[0]
    logged = common.read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert (logged["stage"], logged["states"], logged["examples"]) == ("reflections", 2, 1)
    # the rationales are kept: a rerun builds the same examples without generating
    monkeypatch.setattr(common, "generate", None)
    assert filt.reflection_examples(s, common.init_distributed(), tok, tmp_path, log) == [(prompt, label)]


def test_sr_and_iwm_run_on_collected_alternatives(tmp_path):
    """The whole chain on TextWorld-Express expert data with the tiny model: SR writes a rationale per expert state
    and trains on them mixed with the IL examples; IWM's first stage is WM SFT on the alternatives' triples."""
    data = expert_collect(tmp_path, "expert", n_tasks=3, alternatives=2)
    alt = common.read_jsonl(data / "triples_alt.jsonl")
    tok = common.load_tokenizer("tiny")
    n_il = len(filt.agent_examples(tok, str(data / "episodes.jsonl"), history=2))
    states = {(t["meta"]["rollout"], t["task_id"], t["meta"]["t"]) for t in alt}
    assert len(alt) == 2 * len(states) == 2 * n_il   # every expert step is a state with 2 alternatives
    sr = tmp_path / "sr"
    common_flags = ["--model", "tiny", "--lr", "3e-3", "--batch-size", "4", "--micro-batch", "4", "--epochs", "1",
                    "--max-new-tokens", "12"]
    filt.main(["--sft-only", "--triples", "", "--agent-episodes", str(data / "episodes.jsonl"), "--reflections",
               str(data / "triples_alt.jsonl"), "--out-dir", str(sr), *common_flags])
    assert len(common.read_jsonl(sr / "rationales" / "rank0.jsonl")) == len(states)
    n_sr = metrics(sr, "reflections")[0]["examples"]
    assert 0 < n_sr <= len(states) and len(metrics(sr, "sft")) == (n_il + n_sr) // 4
    iwm = tmp_path / "iwm_wm"
    filt.main(["--sft-only", "--triples", str(data / "triples_alt.jsonl"), "--out-dir", str(iwm), *common_flags])
    assert len(metrics(iwm, "sft")) == len(alt) // 4
    with pytest.raises(SystemExit, match="nothing to train"):
        filt.main(["--sft-only", "--triples", "", "--out-dir", str(tmp_path / "x")])
    with pytest.raises(common.DataError, match="not an alternative-action triple"):
        filt.reflection_states(str(data / "triples.jsonl"))
