"""evaluate.py: the statistics on hand-computed cases, then each --what end to end with the tiny model."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import common
import evaluate
from common import Sample, read_jsonl, write_jsonl
from evaluate import agent_stats, inefficient_steps, pct, weight_change, wilson_interval
from prompts import wm_messages, wm_sft_target

# ----------------------------------------------------------------------------------------------------------
# Wilson interval: published values (Newcombe 1998, Stat. Med. 17:857, Table II, method 3)


@pytest.mark.parametrize("k, n, lo, hi", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                          (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and 0.69 < lo < 0.73  # all wins: upper bound 1, lower well below
    assert wilson_interval(5, 10)[0] == pytest.approx(1 - wilson_interval(5, 10)[1])  # symmetric at p = 0.5


# ----------------------------------------------------------------------------------------------------------
# Inefficient actions and the per-episode statistics

def step(action, next_obs, valid=True):
    return {"obs": "", "action": action, "response": "", "valid": valid, "next_obs": next_obs, "reward": 0.0,
            "done": False}


CRAFTED = [  # (step, inefficient?)
    (step("look", "You are in the middle of a room."), False),              # first look
    (step("go to desk 1", "You arrive at desk 1. On the desk 1, you see a pen 1."), False),
    (step("examine desk 1", "On the desk 1, you see a pen 1."), False),     # first examine of desk 1
    (step("examine desk 1", "On the desk 1, you see a pen 1."), True),      # same question, same answer
    (step("take pen 1 from desk 1", "You pick up the pen 1 from the desk 1."), False),
    (step("examine desk 1", "On the desk 1, you see nothing."), False),     # the answer changed: informative
    (step("inventory", "You are carrying: a pen 1."), False),
    (step("inventory", "You are carrying: a pen 1."), True),
    (step("look around the room", "Nothing happens.", valid=False), False),  # invalid: counted as invalid only
    (step("look", "You are facing the desk 1."), False),                    # differs from the first look
    (step("look", "You are facing the desk 1."), True),
    (step("Examine Desk 1 ", "On the desk 1, you see nothing."), True),     # same action up to case/spaces
]


def test_inefficient_steps_on_a_crafted_episode():
    assert inefficient_steps([s for s, _ in CRAFTED]) == [flag for _, flag in CRAFTED]


def test_agent_stats_pool_steps_over_episodes():
    won = {"success": True, "steps": [s for s, _ in CRAFTED], "task_type": "a"}       # 12 steps, 1 invalid, 4 inefficient
    lost = {"success": False, "steps": [step("go to x", "Nothing happens.", valid=False)] * 3 +
            [step("inventory", "You carry nothing.")] * 5, "task_type": "b"}            # 8 steps, 3 invalid, 4 inefficient
    stats = agent_stats([won, lost])
    assert stats["n_episodes"] == 2 and stats["n_success"] == 1 and stats["success"] == 0.5
    assert stats["success_ci95"] == pytest.approx(list(wilson_interval(1, 2)))
    assert stats["mean_steps"] == 10 and stats["n_steps"] == 20
    assert stats["invalid_rate"] == pytest.approx(4 / 20)
    assert stats["inefficient_rate"] == pytest.approx(8 / 20)
    assert stats["invalid_or_inefficient_rate"] == pytest.approx(12 / 20)
    # the paper's count: every valid look / examine (7 in CRAFTED: not inventory, not the invalid "look around")
    assert stats["inefficient_rate_paper"] == pytest.approx(7 / 20)
    assert stats["invalid_or_inefficient_rate_paper"] == pytest.approx(11 / 20)
    by_type = evaluate.agent_results([won, lost])["by_task_type"]
    assert by_type["a"]["success"] == 1.0 and by_type["b"]["inefficient_rate"] == pytest.approx(4 / 8)


def test_success_mean_and_std_over_rollouts():
    """3 tasks x 3 rollouts; rollout r is one run of the benchmark: 2/3, 1/3, 0/3 -> mean 1/3, sample std 1/3."""
    wins = {("a", 0), ("b", 0), ("a", 1)}
    episodes = [{"task_id": t, "rollout": r, "success": (t, r) in wins, "steps": []} for t in "abc" for r in range(3)]
    stats = agent_stats(episodes)
    assert stats["success_by_rollout"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert stats["success_mean"] == pytest.approx(1 / 3) and stats["success_std"] == pytest.approx(1 / 3)
    assert stats["success"] == pytest.approx(3 / 9) and stats["success_ci95"] == pytest.approx(list(wilson_interval(3, 9)))
    one = agent_stats(episodes[::3])   # rollout 0 only
    assert one["success_by_rollout"] == pytest.approx([2 / 3]) and one["success_std"] == 0.0


def test_agent_eval_samples_three_runs_per_task_by_default(tmp_path):
    res = evaluate.main(["--what", "agent", "--model", "tiny", "--env", "twx", "--split", "train", "--n-tasks", "1",
                         "--max-env-steps", "1", "--max-new-tokens", "4", "--out-dir", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["temperature"], config["rollouts"]) == (1.0, 3)
    assert res["n_episodes"] == 3 and res["trials"] == 3 and len(res["success_by_rollout"]) == 3
    assert sorted(e["rollout"] for e in read_jsonl(tmp_path / "episodes.jsonl")) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# Weight change: |ŵ − w| > η·max(|w|, |ŵ|), η = 1e-3, counted by hand below

BASE = {
    "model.layers.0.self_attn.q_proj.weight": torch.tensor([[1.0, -2.0], [0.5, 0.0]]),
    "model.layers.0.mlp.down_proj.weight": torch.tensor([1.0, 1.0, 1.0, 1.0]),
    "model.layers.1.self_attn.q_proj.weight": torch.tensor([4.0, 4.0]),
    "model.layers.1.input_layernorm.weight": torch.tensor([1.0, 1.0]),
    "model.embed_tokens.weight": torch.tensor([[1.0, 1.0]]),
    "lm_head.weight": torch.tensor([[1.0, 1.0]]),  # tied: saved in one file only
}
TUNED = {
    # 1.01: |d| .01 > .00101 changed; -2 same; 0.5001: 1e-4 < 5.001e-4 kept; 0 -> 1e-6: 1e-6 > 1e-9 changed => 2/4
    "model.layers.0.self_attn.q_proj.weight": torch.tensor([[1.01, -2.0], [0.5001, 1e-6]]),
    # same; 5e-4 < 1.0005e-3 kept; 2e-3 > 1e-3 changed; sign flip changed => 2/4
    "model.layers.0.mlp.down_proj.weight": torch.tensor([1.0, 1.0005, 0.998, -1.0]),
    # 3e-3 < 4.003e-3 kept => 0/2
    "model.layers.1.self_attn.q_proj.weight": torch.tensor([4.0, 4.003]),
    "model.layers.1.input_layernorm.weight": torch.tensor([1.0, 1.0]),  # 0/2
    "model.embed_tokens.weight": torch.tensor([[1.0, 2.0]]),  # 1/2
    "model.new_head.bias": torch.tensor([0.0]),
}
EXPECTED = {"overall": 5 / 14, "n_params": 14, "n_changed": 5, "by_layer": {"0": 4 / 8, "1": 0 / 4},
            "by_module": {"q_proj": 2 / 6, "down_proj": 2 / 4, "other": 1 / 4},
            "only_in_base": ["lm_head.weight"], "only_in_tuned": ["model.new_head.bias"]}


def test_weight_change_exact_on_crafted_weights():
    got = weight_change(BASE, TUNED, eta=1e-3)
    assert {k: got[k] for k in EXPECTED} == EXPECTED


def test_weight_change_threshold_is_relative():
    # η = 0.1: only the zero that became 1e-6 (and the sign flip, and 1 -> 2) still count
    got = weight_change(BASE, TUNED, eta=0.1)
    assert got["n_changed"] == 3
    with pytest.raises(ValueError, match="shape"):
        weight_change(BASE, {"model.embed_tokens.weight": torch.zeros(3)})


def test_weights_cli_streams_safetensors_dirs(tmp_path):
    for name, weights in (("base", BASE), ("tuned", TUNED)):
        (tmp_path / name).mkdir()
        save_file(weights, tmp_path / name / "model.safetensors")
    out = tmp_path / "eval"
    evaluate.main(["--what", "weights", "--model", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                   "--out-dir", str(out)])
    got = json.loads((out / "results.json").read_text())
    assert {k: got[k] for k in EXPECTED} == EXPECTED and got["what"] == "weights"


def test_weights_of_a_saved_checkpoint_against_the_named_base(tmp_path):
    # the pipeline's case: base by name (loaded), checkpoint dir from common.save_checkpoint (streamed)
    model, tok = common.load_model("tiny")
    q = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        q.mul_(1.1)  # every entry moves by 10% of itself: all changed (random init has no exact zeros)
    ckpt = common.save_checkpoint(tmp_path / "ckpt", 1, model, tok)
    out = tmp_path / "eval"
    got = evaluate.main(["--what", "weights", "--model", str(ckpt), "--base", "tiny", "--out-dir", str(out)])
    layer1 = sum(p.numel() for p in model.model.layers[1].parameters())
    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once, as a parameter
    assert got["only_in_base"] == ["lm_head.weight"] and got["only_in_tuned"] == []
    assert got["n_params"] == n_params and got["n_changed"] == q.numel()
    assert got["by_layer"] == {"0": 0.0, "1": q.numel() / layer1}
    assert got["by_module"]["q_proj"] == 0.5 and got["by_module"]["k_proj"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# World-model evaluation

TRIPLES = [
    {"id": f"t{i}", "env": env, "task_id": "g", "instruction": "put a pen in the drawer.", "history": [],
     "state": "You arrive at desk 1.", "action": action, "next_state": truth, "next_kind": kind, "meta": {}}
    for i, (env, action, truth, kind) in enumerate([
        ("alfworld", "open drawer 1", "You open the drawer 1. The drawer 1 is open. In it, you see a key 2.", "obs"),
        ("alfworld", "take pen 1 from desk 1", "You pick up the pen 1 from the desk 1.", "obs"),
        ("twx", "look around", "You are in the kitchen. In one part of the room you see a fridge.", "obs"),
        ("tau2", "What is your order id?", "My order id is #W123 and I want to return it.", "user"),
    ])]


@pytest.fixture
def triples_file(tmp_path):
    path = tmp_path / "triples_val.jsonl"
    write_jsonl(path, TRIPLES)
    return path


def test_wm_eval_with_the_tiny_model(tmp_path, triples_file):
    out = tmp_path / "wm"
    evaluate.main(["--what", "wm", "--model", "tiny", "--triples", str(triples_file), "--max-new-tokens", "8",
                   "--out-dir", str(out)])
    res = json.loads((out / "results.json").read_text())
    preds = read_jsonl(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == [t["id"] for t in TRIPLES]
    assert res["n"] == 4 and res["accuracy"] == pytest.approx(sum(p["reward"] for p in preds) / 4)
    assert res["by_env"]["alfworld"]["n"] == 2 and res["by_next_kind"]["user"]["n"] == 1
    assert res["missing_rate"] == 1.0  # 8 random tokens never close a <next_state> block


def test_wm_accuracy_by_env_and_kind(tmp_path, triples_file, monkeypatch):
    # an oracle that answers the truth on triples 0 and 3 and an unrelated observation elsewhere
    def oracle(model, tok, prompts, *args, **kw):
        texts = [wm_sft_target(t["next_state"]) if i in (0, 3) else wm_sft_target("Nothing happens.")
                 for i, t in enumerate(TRIPLES)]
        return [Sample(p, [1], text, [0.0], True) for p, text in zip(prompts, texts)]
    monkeypatch.setattr(evaluate, "generate", oracle)
    out = tmp_path / "wm"
    evaluate.main(["--what", "wm", "--model", "tiny", "--triples", str(triples_file), "--out-dir", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["accuracy"] == 0.5 and res["missing_rate"] == 0.0
    assert res["by_env"]["alfworld"]["accuracy"] == 0.5 and res["by_env"]["twx"]["accuracy"] == 0.0
    assert res["by_next_kind"] == {"obs": {"n": 3, "k": 1, "ci95": list(wilson_interval(1, 3)),
                                           "accuracy": pytest.approx(1 / 3), "missing_rate": 0.0},
                                   "user": {"n": 1, "k": 1, "ci95": list(wilson_interval(1, 1)), "accuracy": 1.0,
                                            "missing_rate": 0.0}}
    assert res["k"] == 2 and res["ci95"] == list(wilson_interval(2, 4))


@pytest.mark.parametrize("wm_prompt", ["rwml", "sft"])
def test_wm_eval_prompts_with_the_prompt_the_checkpoint_was_trained_on(tmp_path, triples_file, monkeypatch, wm_prompt):
    seen = []

    def record(model, tok, prompts, *args, **kw):
        seen.extend(prompts)
        return [Sample(p, [1], wm_sft_target("x"), [0.0], True) for p in prompts]
    monkeypatch.setattr(evaluate, "generate", record)
    evaluate.main(["--what", "wm", "--model", "tiny", "--triples", str(triples_file), "--wm-prompt", wm_prompt,
                   "--out-dir", str(tmp_path / "wm")])
    tok = common.load_tokenizer("tiny")
    assert seen == [common.chat_ids(tok, wm_messages(t, wm_prompt)) for t in TRIPLES]
    assert json.loads((tmp_path / "wm" / "results.json").read_text())["wm_prompt"] == wm_prompt
    assert json.loads((tmp_path / "wm" / "config.json").read_text())["temperature"] == 0.0   # wm stays greedy


def test_wm_eval_names_a_bad_triples_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TRIPLES[0]) + "\n" + json.dumps({"id": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing key"):
        evaluate.main(["--what", "wm", "--model", "tiny", "--triples", str(path), "--out-dir", str(tmp_path / "o")])


# ----------------------------------------------------------------------------------------------------------
# Report

def agent_result(env, split, wins, n, invalid=0.25, by_task_type=()):
    def stats(wins, n):
        return {"n_episodes": n, "n_success": wins, "success": wins / n, "success_ci95": list(wilson_interval(wins, n)),
                "mean_steps": 12.5, "n_steps": 10 * n, "invalid_rate": invalid, "inefficient_rate": 0.1,
                "invalid_or_inefficient_rate": 0.35, "n_errors": 0}
    return {"what": "agent", "model": "m", "env": env, "split": split, **stats(wins, n),
            "by_task_type": {t: stats(w, k) for t, w, k in by_task_type}}


def write_results(path, results):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))


def test_report_writes_tables_and_plots(tmp_path):
    runs = tmp_path / "eval"
    write_results(runs / "base" / "seen", agent_result("alfworld", "valid_seen", 1, 10,
                                                       by_task_type=[("heat", 1, 4), ("cool", 0, 6)]))
    write_results(runs / "base" / "unseen", agent_result("alfworld", "valid_unseen", 0, 5,
                                                         by_task_type=[("heat", 0, 5)]))
    write_results(runs / "rwml" / "seen", agent_result("alfworld", "valid_seen", 6, 10, invalid=0.5))
    write_results(runs / "rwml" / "unseen", agent_result("alfworld", "valid_unseen", 3, 5))
    write_results(runs / "rwml" / "wm", {"what": "wm", "model": "m", "triples": "x/triples_val.jsonl", "n": 4,
                                          "k": 2, "ci95": list(wilson_interval(2, 4)), "accuracy": 0.5, "missing_rate": 0.0,
                                          "by_env": {"alfworld": {"n": 4, "accuracy": 0.5, "missing_rate": 0.0}},
                                          "by_next_kind": {"obs": {"n": 4, "accuracy": 0.5, "missing_rate": 0.0}}})
    write_results(runs / "rwml" / "weights", {"what": "weights", "model": "m", "base": "b",
                                               **weight_change(BASE, TUNED)})
    train = tmp_path / "train_rwml"
    train.mkdir()
    write_jsonl(train / "metrics.jsonl", [{"step": i, "time": 1.0, "reward_mean": i / 10, "kl": 0.01 * i,
                                           "phase": "train"} for i in range(5)] + [{"step": 4, "heldout_acc": 0.3}])
    out = tmp_path / "report"
    text = evaluate.main(["--what", "report", "--runs", f"base={runs / 'base'},rwml={runs / 'rwml'}",
                          "--curves", f"rwml={train}", "--out-dir", str(out)])
    assert (out / "report.md").read_text() == text
    lines = text[text.index("## Details"):].splitlines()  # the detailed tables, below the one of all arms
    header = next(line for line in lines if line.startswith("| run | alfworld valid_seen"))
    assert header.endswith("| alfworld avg |")
    base_row = next(line for line in lines if line.startswith("| base |"))
    rwml_row = next(line for line in lines if line.startswith("| rwml |"))
    assert "| 10.0 [" in base_row and base_row.endswith("| 6.7 |")   # pooled: 1 / 15
    assert "| 60.0 [" in rwml_row and rwml_row.endswith("| 60.0 |")  # pooled: 9 / 15
    assert "| rwml | 50.0 / 10.0 / 12.5 |" in text  # invalid / inefficient / mean steps
    assert "| run | alfworld cool | alfworld heat |" in text
    assert "| base | 0.0 (n=6) | 11.1 (n=9) |" in text and "| rwml | – | – |" in text  # heat pooled: 1 / 9
    assert "| rwml | triples_val.jsonl | 4 | 50.0 |" in text
    assert "| rwml | b | 35.71 | 33.33 | 50.00 | 25.00 |" in text  # 5/14 overall; q, down, other
    for png in ("curves.png", "weight_change.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000
        assert f"({png})" in text


def test_report_names_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="--runs: expected name=path"):
        evaluate.main(["--what", "report", "--runs", "justadir", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no results.json under"):
        evaluate.main(["--what", "report", "--runs", f"x={tmp_path / 'empty'}", "--out-dir", str(tmp_path)])
    write_results(tmp_path / "run" / "greedy", agent_result("alfworld", "valid_seen", 1, 10))
    write_results(tmp_path / "run" / "sampled", agent_result("alfworld", "valid_seen", 2, 10))
    with pytest.raises(SystemExit, match="both hold alfworld valid_seen agent results"):
        evaluate.main(["--what", "report", "--runs", f"x={tmp_path / 'run'}", "--out-dir", str(tmp_path / "r")])
    write_jsonl(tmp_path / "m.jsonl", [{"step": 1, "loss": 0.5}])  # none of the six curves a reader needs
    with pytest.raises(SystemExit, match="none of reward_mean, val_acc"):
        evaluate.main(["--what", "report", "--curves", f"x={tmp_path / 'm.jsonl'}", "--out-dir", str(tmp_path / "r")])


# ----------------------------------------------------------------------------------------------------------
# Agent evaluation on fixture ALFWorld games: results, and a resume that neither repeats nor loses an episode

FIXTURE_GAMES = Path(__file__).resolve().parent / "fixtures" / "alfworld"


def agent_eval(out, n_tasks):
    return evaluate.main(["--what", "agent", "--model", "tiny", "--env", "alfworld", "--split", "valid_seen",
                          "--n-tasks", str(n_tasks), "--max-env-steps", "2", "--max-new-tokens", "8", "--greedy",
                          "--out-dir", str(out)])


@pytest.mark.slow  # four evaluate runs, five ALFWorld game loads: ~30-50 s on a busy 2-core box
def test_agent_eval_writes_results_and_resumes_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(FIXTURE_GAMES))
    out = tmp_path / "eval"
    res = agent_eval(out, 1)
    first = read_jsonl(out / "episodes.jsonl")
    assert len(first) == 1 and res["n_episodes"] == 1 and res["n_steps"] == 2 == len(first[0]["steps"])
    assert "sample" not in first[0]["steps"][0] and first[0]["model"] == "tiny"
    # 8 random tokens never make an <action> block: every step is invalid, no episode is won
    assert res["invalid_rate"] == 1.0 and res["success"] == 0.0 and res["success_ci95"][0] == 0.0
    assert list(res["by_task_type"]) == [first[0]["task_type"]]
    assert json.loads((out / "results.json").read_text()) == res
    config = json.loads((out / "config.json").read_text())
    assert (config["temperature"], config["rollouts"]) == (0.0, 1)   # --greedy, resolved

    # a larger run in the same dir plays only the new task
    res = agent_eval(out, 2)
    second = read_jsonl(out / "episodes.jsonl")
    assert res["n_episodes"] == 2 and len(second) == 2 and second[0] == first[0]

    # a kill mid-write leaves a torn last line, an env crash an "error" row: both are played again, once
    lines = (out / "episodes.jsonl").read_text().splitlines(keepends=True)
    crashed = {**second[0], "error": "step failed: boom"}
    (out / "episodes.jsonl").write_text(json.dumps(crashed) + "\n" + lines[1][:40])
    res = agent_eval(out, 2)
    third = read_jsonl(out / "episodes.jsonl")
    assert sorted(map(json.dumps, third)) == sorted(map(json.dumps, second))  # greedy: replayed == original
    assert res["n_episodes"] == 2 and res["n_errors"] == 0

    # nothing left to play: the model is not even loaded
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded a model with nothing to play"))
    assert agent_eval(out, 2)["n_episodes"] == 2
    with pytest.raises(SystemExit, match="--temperature 0.0 -> 1.0"):
        evaluate.main(["--what", "agent", "--model", "tiny", "--split", "valid_seen", "--temperature", "1.0",
                       "--out-dir", str(out)])


# ----------------------------------------------------------------------------------------------------------
# World-model sample, forgetting probe, every arm in one process, summary.json

def many_triples(path, n=12):
    rows = [{**TRIPLES[i % 2], "id": f"m{i:02d}", "action": f"open drawer {i}"} for i in range(n)]
    write_jsonl(path, rows)
    return rows


def no_reward(s):  # a stand-in for the MiniLM reward where only the sampling is under test
    return lambda texts, triples: torch.zeros(len(texts))


def test_wm_eval_samples_seeded_triples_not_the_first_n(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "make_reward", no_reward)
    rows = many_triples(tmp_path / "t.jsonl")

    def sampled(seed, out):
        res = evaluate.main(["--what", "wm", "--model", "tiny", "--triples", str(tmp_path / "t.jsonl"),
                             "--n-triples", "4", "--seed", str(seed), "--max-new-tokens", "2",
                             "--out-dir", str(tmp_path / out)])
        assert res["n"] == 4 and res["k"] == 0 and res["ci95"] == list(wilson_interval(0, 4))
        return [p["id"] for p in read_jsonl(tmp_path / out / "predictions.jsonl")]
    first = sampled(0, "a")
    assert first != [r["id"] for r in rows[:4]] and first == sorted(first)  # a sample, kept in file order
    assert sampled(0, "b") == first and sampled(1, "c") != first


def test_contains_answer_matches_whole_words():
    assert evaluate.contains_answer("The capital is Paris.", ["paris"])
    assert evaluate.contains_answer("It is 7, I think", ["7", "seven"])
    assert not evaluate.contains_answer("It is 17.", ["7"]) and not evaluate.contains_answer("Parisian", ["paris"])


PROBE_ROWS = [{"id": "p0", "prompt": "What is 2 plus 3?", "answer": "2 plus 3 is 5.", "accept": ["5", "five"]},
              {"id": "p1", "prompt": "What color is the sky?", "answer": "The sky is blue.", "accept": ["blue"]},
              {"id": "p2", "prompt": "What do bees make?", "answer": "Bees make honey.", "accept": ["honey"]}]


@pytest.fixture
def probe_file(tmp_path):
    write_jsonl(tmp_path / "probe.jsonl", PROBE_ROWS)
    return tmp_path / "probe.jsonl"


def test_shipped_probe_is_well_formed():
    rows = read_jsonl(evaluate.PROBE, required=evaluate.PROBE_KEYS)
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 60 and len({r["prompt"] for r in rows}) == 60
    # every reference answer passes its own check: the greedy check can reward the answer the NLL measures
    assert all(evaluate.contains_answer(r["answer"], r["accept"]) for r in rows)


def fit(model, tok, seqs: list[tuple[list[int], list[int]]], steps: int):
    """A few Adam steps of cross-entropy on the answer ids of (prompt ids, answer ids) pairs: a tiny model that
    'knows' the answers."""
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels, attn = torch.full_like(ids, -100), torch.zeros_like(ids)
    for b, (p, a) in enumerate(seqs):
        ids[b, :len(p) + len(a)] = torch.tensor(p + a)
        labels[b, len(p):len(p) + len(a)] = torch.tensor(a)
        attn[b, :len(p) + len(a)] = 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def fit_to_probe(model, tok, steps=40):
    """The probe's reference answers (NLL far below ln V)."""
    from common import chat_ids
    return fit(model, tok, [(chat_ids(tok, [{"role": "user", "content": q["prompt"]}]),
                             tok(q["answer"], add_special_tokens=False)["input_ids"]) for q in PROBE_ROWS], steps)


def fitted_and_perturbed(tmp_path, fit_fn) -> None:
    """tmp_path/fitted: the tiny model after fit_fn; tmp_path/perturbed: the same with Gaussian noise on every
    weight (0.5 of each tensor's std), which loses what it was fitted to."""
    torch.manual_seed(0)
    model, tok = common.load_model("tiny")
    fit_fn(model, tok)
    model.save_pretrained(tmp_path / "fitted")
    tok.save_pretrained(tmp_path / "fitted")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    model.save_pretrained(tmp_path / "perturbed")
    tok.save_pretrained(tmp_path / "perturbed")


def test_forgetting_nll_rises_for_a_perturbed_model(tmp_path, probe_file):
    fitted_and_perturbed(tmp_path, fit_to_probe)
    evaluate.main(["--what", "arms", "--arms", f"base={tmp_path / 'fitted'},rwml={tmp_path / 'perturbed'}",
                   "--evals", "forgetting", "--probe", str(probe_file), "--probe-max-new-tokens", "4",
                   "--out-dir", str(tmp_path / "eval")])
    evaluate.main(["--what", "report", "--runs", f"base={tmp_path / 'eval/base'},rwml={tmp_path / 'eval/rwml'}",
                   "--out-dir", str(tmp_path / "report")])
    runs = json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]
    fitted, perturbed = runs["base"]["forgetting"], runs["rwml"]["forgetting"]
    assert fitted["nll"] < 5.0 and fitted["nll_delta"] == 0.0  # fitted: far below ln(49152) = 10.8
    assert perturbed["nll_delta"] == pytest.approx(perturbed["nll"] - fitted["nll"]) and perturbed["nll_delta"] > 1.0
    answers = read_jsonl(tmp_path / "eval" / "base" / "forgetting" / "answers.jsonl")
    assert [a["id"] for a in answers] == ["p0", "p1", "p2"] and fitted["n_tokens"] == sum(a["n_tokens"] for a in answers)


def save_tiny(path, scale=None):
    """The tiny model as a model dir (scale: multiply one q_proj by it first, a 'trained' arm); returns the dir."""
    model, tok = common.load_model("tiny")
    if scale is not None:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow  # two arms x (wm, forgetting, an ALFWorld fixture game, weights), three times: ~30 s
def test_arms_load_each_model_once_and_resume(tmp_path, monkeypatch, probe_file):
    import rewards
    monkeypatch.setenv("ALFWORLD_DATA", str(FIXTURE_GAMES))
    many_triples(tmp_path / "t.jsonl", 6)
    base, rwml = save_tiny(tmp_path / "start"), save_tiny(tmp_path / "rwml_model", scale=1.5)
    loads, embedders = [], []
    real_load, real_embedder = evaluate.load_model, rewards.load_embedder
    monkeypatch.setattr(evaluate, "load_model", lambda name, *a, **k: loads.append(name) or real_load(name, *a, **k))
    monkeypatch.setattr(rewards, "load_embedder", lambda *a, **k: embedders.append(a) or real_embedder(*a, **k))
    out = tmp_path / "eval"
    argv = ["--what", "arms", "--arms", f"base={base},rwml={rwml}", "--triples", str(tmp_path / "t.jsonl"),
            "--n-triples", "4", "--probe", str(probe_file), "--agent-splits", "valid_seen", "--n-tasks", "1",
            "--max-env-steps", "1", "--max-new-tokens", "4", "--probe-max-new-tokens", "4", "--out-dir", str(out)]
    got = evaluate.main(argv)
    assert loads == [base, rwml] and len(embedders) == 1
    assert set(got["base"]) == {"wm", "forgetting", "alfworld/valid_seen"}  # the start arm: no weights vs itself
    assert set(got["rwml"]) == {"wm", "forgetting", "alfworld/valid_seen", "weights"}
    q = common.load_model("tiny")[0].model.layers[0].self_attn.q_proj.weight
    assert got["rwml"]["weights"]["n_changed"] == q.numel() and got["rwml"]["weights"]["base"] == base
    folders = {"wm": "wm", "forgetting": "forgetting", "alfworld/valid_seen": "alfworld_valid_seen", "weights": "weights"}
    for arm in ("base", "rwml"):  # the layout --what report reads
        for key, result in got[arm].items():
            assert json.loads((out / arm / folders[key] / "results.json").read_text()) == result
    # a rerun finds everything done: no model, no embedder
    loads.clear(), embedders.clear()
    assert evaluate.main(argv) == got and loads == [] and embedders == []
    # a kill before rwml's forgetting finished: only that runs again, loading only rwml's model
    (out / "rwml" / "forgetting" / "results.json").unlink()
    assert evaluate.main(argv) == got and loads == [rwml] and embedders == []
    # and a rerun with other settings into the same dir is refused, naming the flag
    with pytest.raises(SystemExit, match="--n-triples 4 -> 5"):
        evaluate.main(argv[:-2] + ["--n-triples", "5", "--out-dir", str(out)])


def test_summary_json_and_report_table(tmp_path):
    runs = tmp_path / "eval"
    wm = lambda k, n: {"what": "wm", "model": "m", "triples": "t.jsonl", "n": n, "k": k,  # noqa: E731
                       "ci95": list(wilson_interval(k, n)), "accuracy": k / n, "missing_rate": 0.0,
                       "by_env": {}, "by_next_kind": {}}
    forgetting = lambda nll, k: {"what": "forgetting", "model": "m", "probe": "p", "n": 60,  # noqa: E731
                                 "n_tokens": 500, "nll": nll,
                                 "contains": {"k": k, "n": 60, "ci95": list(wilson_interval(k, 60))}}
    write_results(runs / "base" / "wm", wm(60, 200))
    write_results(runs / "base" / "forgetting", forgetting(2.0, 30))
    write_results(runs / "base" / "alfworld_valid_seen", agent_result("alfworld", "valid_seen", 1, 10))
    write_results(runs / "rwml" / "wm", wm(90, 200))
    write_results(runs / "rwml" / "forgetting", forgetting(2.25, 28))
    write_results(runs / "rwml" / "weights", {"what": "weights", "model": "m", "base": "b",
                                               **weight_change(BASE, TUNED)})
    write_results(runs / "rwml" / "alfworld_valid_seen", agent_result("alfworld", "valid_seen", 3, 10, invalid=0.5))
    write_results(runs / "rwml" / "alfworld_valid_unseen", agent_result("alfworld", "valid_unseen", 2, 8))
    pipeline = tmp_path / "run"
    for stage, sec in (("collect", 120), ("rwml", 300), ("eval", 95)):
        (pipeline / stage).mkdir(parents=True)
        (pipeline / stage / "DONE").write_text(f"{sec} s\n")
    out = tmp_path / "report"
    text = evaluate.main(["--what", "report", "--runs", f"base={runs / 'base'},rwml={runs / 'rwml'}",
                          "--stages", str(pipeline), "--out-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"runs", "stages", "wall_s"}
    assert summary["stages"] == {"collect": 120.0, "rwml": 300.0, "eval": 95.0} and summary["wall_s"] == 515.0
    assert summary["runs"]["base"] == {
        "wm_accuracy": {"k": 60, "n": 200, "ci95": list(wilson_interval(60, 200))},
        "agent": {"alfworld/valid_seen": {"k": 1, "n": 10, "ci95": list(wilson_interval(1, 10))}},
        "success": {"k": 1, "n": 10, "ci95": list(wilson_interval(1, 10))}, "invalid_rate": 0.25,
        "weights_changed": None,
        "forgetting": {"nll": 2.0, "nll_delta": 0.0, "n_tokens": 500,
                       "contains": {"k": 30, "n": 60, "ci95": list(wilson_interval(30, 60))}, "lm_eval": {}},
        "checkpoints": []}
    rwml = summary["runs"]["rwml"]
    assert rwml["weights_changed"] == 5 / 14 and rwml["forgetting"]["nll_delta"] == 0.25
    assert set(rwml["agent"]) == {"alfworld/valid_seen", "alfworld/valid_unseen"}
    assert rwml["agent"]["alfworld/valid_unseen"]["k"] == 2 and rwml["wm_accuracy"]["k"] == 90
    # pooled over the splits: 5 of 18 episodes; invalid steps 0.5 x 100 + 0.25 x 80 of 180
    assert rwml["success"] == {"k": 5, "n": 18, "ci95": list(wilson_interval(5, 18))}
    assert rwml["invalid_rate"] == pytest.approx(70 / 180)
    # one table, every arm: WM accuracy, success per split and pooled, invalid actions, params changed, probe NLL
    # (change), probe answers
    assert ("| arm | WM accuracy | alfworld/valid_seen success | alfworld/valid_unseen success | success, all splits "
            "| invalid actions | params changed |") in text
    lo, hi = wilson_interval(90, 200)
    assert f"| rwml | 45.0 [{pct(lo)}, {pct(hi)}] (90/200) | 30.0 [" in text
    assert "(5/18) | 38.9 | 35.71 | 2.250 (+0.250) | 46.7 [" in text and "| base | 30.0 [" in text
    assert "(1/10) | 25.0 | – | 2.000 | 50.0 [" in text
    assert "| **total** | 515 |" in text and text.index("### All arms") < text.index("### Stage times")
    (pipeline / "eval" / "DONE").write_text("done\n")
    with pytest.raises(SystemExit, match=r"eval/DONE: expected '<seconds> s'"):
        evaluate.main(["--what", "report", "--runs", f"base={runs / 'base'}", "--stages", str(pipeline),
                       "--out-dir", str(out)])


def wm_result(k, n):
    return {"what": "wm", "model": "m", "triples": "t.jsonl", "n": n, "k": k, "ci95": list(wilson_interval(k, n)),
            "accuracy": k / n, "missing_rate": 0.0, "by_env": {}, "by_next_kind": {}}


def test_report_one_table_and_the_wm_vs_success_plot_with_checkpoint_lines(tmp_path, monkeypatch):
    """Every arm in the one table; the plot has a point per arm with both numbers (policy has no WM accuracy: none),
    and dyna's evaluated checkpoints (written out of order) form its line in step order, ending at dyna itself;
    summary.json holds those checkpoint points. Checkpoint results never count as the arm's own."""
    import matplotlib.figure
    runs = tmp_path / "eval"
    for arm, wm, wins in (("base", (60, 200), 1), ("rwml", (90, 200), 2), ("policy", None, 3), ("dyna", (100, 200), 5)):
        if wm:
            write_results(runs / arm / "wm", wm_result(*wm))
        write_results(runs / arm / "twx_test", agent_result("twx", "test", wins, 16))
    for step, wm, wins in ((10, 95, 4), (2, 70, 2)):
        write_results(runs / "dyna" / "checkpoints" / f"step_{step:06d}" / "wm", wm_result(wm, 200))
        write_results(runs / "dyna" / "checkpoints" / f"step_{step:06d}" / "twx_test",
                      agent_result("twx", "test", wins, 16, invalid=0.5))
    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: figures.append((Path(path).name, fig)) or savefig(fig, path, **kw))
    out = tmp_path / "report"
    text = evaluate.main(["--what", "report", "--runs", ",".join(f"{a}={runs / a}" for a in ("base", "rwml", "policy",
                                                                                              "dyna")),
                          "--out-dir", str(out)])
    table = text[text.index("### All arms"):text.index("### World-model accuracy vs task success")]
    assert "| arm | WM accuracy | twx/test success | invalid actions | params changed |" in table
    for arm in ("base", "rwml", "policy", "dyna"):
        assert f"| {arm} |" in table
    assert "| policy | – | 18.8 [" in table and "(5/16) | 25.0 |" in table
    summary = json.loads((out / "summary.json").read_text())["runs"]
    assert [c["step"] for c in summary["dyna"]["checkpoints"]] == [2, 10] and summary["rwml"]["checkpoints"] == []
    assert summary["dyna"]["checkpoints"][0] == {
        "step": 2, "wm_accuracy": {"k": 70, "n": 200, "ci95": list(wilson_interval(70, 200))},
        "agent": {"twx/test": {"k": 2, "n": 16, "ci95": list(wilson_interval(2, 16))}},
        "success": {"k": 2, "n": 16, "ci95": list(wilson_interval(2, 16))}, "invalid_rate": 0.5}
    assert summary["dyna"]["success"]["k"] == 5 and summary["dyna"]["wm_accuracy"]["k"] == 100
    assert "(wm_vs_success.png)" in text and (out / "wm_vs_success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = dict(figures)["wm_vs_success.png"].axes
    handles, labels = ax.get_legend_handles_labels()
    assert sorted(labels) == ["base", "dyna", "dyna (checkpoints)", "rwml"]
    line = next(h for h, label in zip(handles, labels) if label == "dyna (checkpoints)")
    assert line.get_xydata().tolist() == [[35.0, 12.5], [47.5, 25.0], [50.0, 31.25]]
    point, _, (xbar, ybar) = handles[labels.index("rwml")].lines   # 45% [lo, hi] of WM accuracy, 2/16 success
    assert point.get_xydata().tolist() == [[45.0, 12.5]]
    (lo, hi), (slo, shi) = wilson_interval(90, 200), wilson_interval(2, 16)
    assert xbar.get_segments()[0].ravel().tolist() == pytest.approx([100 * lo, 12.5, 100 * hi, 12.5])
    assert ybar.get_segments()[0].ravel().tolist() == pytest.approx([45.0, 100 * slo, 45.0, 100 * shi])


def test_arms_checkpoints_all_evaluates_each_earlier_checkpoint(tmp_path, monkeypatch):
    """--checkpoints all on a training run dir with three checkpoints: the run (its newest checkpoint) as the arm,
    and steps 1 and 2 each evaluated once for WM accuracy and agent success into checkpoints/step_N/; a rerun
    loads nothing; the report draws them."""
    monkeypatch.setattr(evaluate, "make_reward", no_reward)
    many_triples(tmp_path / "t.jsonl", 6)
    run = tmp_path / "dyna_run"
    model, tok = common.load_model("tiny")
    for step in (1, 2, 3):
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        common.save_checkpoint(run / "ckpt", step, model, tok, keep=3)
    loads = []
    real_load = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda name, *a, **k: loads.append(name) or real_load(name, *a, **k))
    out = tmp_path / "eval"
    argv = ["--what", "arms", "--arms", f"dyna={run}", "--evals", "wm,agent", "--checkpoints", "all", "--triples",
            str(tmp_path / "t.jsonl"), "--n-triples", "4", "--env", "twx", "--agent-splits", "test", "--n-tasks", "1",
            "--max-env-steps", "1", "--max-new-tokens", "4", "--greedy", "--out-dir", str(out)]
    got = evaluate.main(argv)["dyna"]
    steps = [run / "ckpt" / f"step_00000{i}" for i in (1, 2)]
    assert loads == [str(run)] + [str(p) for p in steps]
    assert set(got) == {"wm", "twx/test"} | {f"checkpoints/{p.name}/{e}" for p in steps for e in ("wm", "twx/test")}
    for p in steps:
        for folder, key in (("wm", "wm"), ("twx_test", "twx/test")):
            result = json.loads((out / "dyna" / "checkpoints" / p.name / folder / "results.json").read_text())
            assert result == got[f"checkpoints/{p.name}/{key}"] and result["model"] == str(p)
    assert got["twx/test"]["model"] == str(run) and not (out / "dyna" / "checkpoints" / "step_000003").exists()
    loads.clear()
    assert evaluate.main(argv)["dyna"] == got and loads == []
    evaluate.main(["--what", "report", "--runs", f"dyna={out / 'dyna'}", "--out-dir", str(tmp_path / "report")])
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]["dyna"]
    assert [c["step"] for c in summary["checkpoints"]] == [1, 2] and summary["success"]["n"] == 1
    assert (tmp_path / "report" / "wm_vs_success.png").exists()


# ----------------------------------------------------------------------------------------------------------
# Forgetting through lm-eval (paper Table 3), offline on the local tasks of data/lm_eval

LM_EVAL_DIR = Path(evaluate.__file__).resolve().parent / "data" / "lm_eval"


def test_lm_eval_scores_keep_every_metric_with_its_stderr():
    res = {"results": {"grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": 0.1},
                       "grp_a": {"alias": "a", "sample_len": 3, "acc,none": 1.0, "acc_stderr,none": "N/A",
                                 "exact_match,strict": 0.25, "exact_match_stderr,strict": float("nan")}},
           "n-samples": {"grp_a": {"original": 4, "effective": 3}, "grp_b": {"original": 5, "effective": 5}}}
    got = evaluate.lm_eval_scores(res, "grp")
    assert got == {"metrics": {"acc,none": {"value": 0.5, "stderr": 0.1}}, "n": 8, "parts": {"grp_a": {
        "acc,none": {"value": 1.0, "stderr": None}, "exact_match,strict": {"value": 0.25, "stderr": None}}}}
    assert evaluate.lm_eval_scores(res, "a_tag")["metrics"] == {}  # a tag has no row of its own: its parts hold it


def test_shipped_lm_eval_tasks_are_well_formed():
    mc = read_jsonl(LM_EVAL_DIR / "rwml_general_mc.jsonl", required=("id", "question", "choices", "answer"))
    gen = read_jsonl(LM_EVAL_DIR / "rwml_general_gen.jsonl", required=("id", "question", "answer"))
    assert len(mc) >= 10 and all(len(r["choices"]) == 4 and r["answer"] in range(4) for r in mc)
    assert len(gen) >= 10 and all(r["answer"] and " " not in r["answer"] for r in gen)  # one word each
    assert len({r["id"] for r in mc + gen}) == len(mc) + len(gen)
    import importlib.util
    spec = importlib.util.spec_from_file_location("rwml_general", LM_EVAL_DIR / "rwml_general.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.contains({"answer": "15"}, ["7 + 8 = 15."]) == {"contains": 1.0}
    assert module.contains({"answer": "15"}, ["It is 115"]) == module.contains({"answer": "Green"}, [""]) == \
        {"contains": 0.0}
    assert module.contains({"answer": "Green"}, ["GREEN, of course"])["contains"] == 1.0


def fit_to_choices(model, tok, steps=60):
    """"Question: q\nAnswer: <right choice>" (lm-eval's plain multiple-choice prompt): a tiny model that knows the
    local task's answers."""
    rows = read_jsonl(LM_EVAL_DIR / "rwml_general_mc.jsonl")
    return fit(model, tok, [(tok(f"Question: {r['question']}\nAnswer:")["input_ids"],
                             tok(" " + r["choices"][r["answer"]], add_special_tokens=False)["input_ids"]) for r in rows],
               steps)


@pytest.mark.slow  # lm-eval's import and two arms x (probe, two local tasks): ~40 s on the 2-core box
def test_lm_eval_forgetting_on_local_tasks_into_the_report(tmp_path, probe_file, monkeypatch):
    """Two arms through lm-eval on the shipped local tasks: a model fitted to the multiple-choice answers scores
    all of them, the same model perturbed does not; the numbers land in results.json, lm_eval.jsonl, summary.json
    and the report's forgetting table, and a rerun reuses the finished tasks."""
    fitted_and_perturbed(tmp_path, fit_to_choices)
    argv = ["--what", "arms", "--arms", f"base={tmp_path / 'fitted'},rwml={tmp_path / 'perturbed'}",
            "--evals", "forgetting", "--probe", str(probe_file), "--probe-max-new-tokens", "2",
            "--lm-eval-tasks", "rwml_general_mc,rwml_general_gen", "--lm-eval-include", str(LM_EVAL_DIR),
            "--no-lm-eval-chat", "--out-dir", str(tmp_path / "eval")]
    got = evaluate.main(argv)
    fitted, perturbed = got["base"]["forgetting"]["lm_eval"], got["rwml"]["forgetting"]["lm_eval"]
    assert set(fitted) == set(perturbed) == {"rwml_general_mc", "rwml_general_gen"}
    acc = fitted["rwml_general_mc"]["metrics"]["acc,none"]
    assert acc["value"] == 1.0 and fitted["rwml_general_mc"]["n"] == 12  # the loaded model was the one scored
    assert perturbed["rwml_general_mc"]["metrics"]["acc,none"]["value"] < 1.0
    assert 0 < perturbed["rwml_general_mc"]["metrics"]["acc,none"]["stderr"] < 0.2
    assert fitted["rwml_general_gen"]["n"] == 10 and "contains,none" in fitted["rwml_general_gen"]["metrics"]
    rows = read_jsonl(tmp_path / "eval" / "base" / "forgetting" / "lm_eval.jsonl")
    assert [r["task"] for r in rows] == ["rwml_general_mc", "rwml_general_gen"]
    evaluate.main(["--what", "report", "--runs", f"base={tmp_path / 'eval/base'},rwml={tmp_path / 'eval/rwml'}",
                   "--out-dir", str(tmp_path / "report")])
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]
    assert summary["base"]["forgetting"]["lm_eval"]["rwml_general_mc"] == {
        "n": 12, "metrics": fitted["rwml_general_mc"]["metrics"]}
    text = (tmp_path / "report" / "report.md").read_text()
    p = perturbed["rwml_general_mc"]["metrics"]["acc,none"]
    assert "| benchmark | metric | n | base | rwml |" in text
    assert f"| rwml_general_mc | acc,none | 12 | 1.000 ± 0.000 | {p['value']:.3f} ± {p['stderr']:.3f} |" in text
    assert "| probe (--probe) | NLL/token (lower is better) | – |" in text
    # a kill after the first task: the rerun runs only the second one
    (tmp_path / "eval" / "rwml" / "forgetting" / "results.json").unlink()
    path = tmp_path / "eval" / "rwml" / "forgetting" / "lm_eval.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    import lm_eval
    ran = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: ran.append(kw["tasks"]) or real(**kw))
    again = evaluate.main(argv)["rwml"]["forgetting"]["lm_eval"]
    assert again["rwml_general_mc"] == perturbed["rwml_general_mc"]  # read back, not rerun
    assert again["rwml_general_gen"]["metrics"] == perturbed["rwml_general_gen"]["metrics"]  # rerun, same greedy
    assert [[t.task_name for t in tasks] for tasks in ran] == [["rwml_general_gen"]]


def test_lm_eval_bad_tasks_are_named_before_the_model_loads(tmp_path, probe_file, monkeypatch):
    monkeypatch.setattr(evaluate, "eval_model", lambda *a: pytest.fail("the model loaded before the task check"))

    def forgetting(*flags):
        return evaluate.main(["--what", "forgetting", "--model", "tiny", "--probe", str(probe_file),
                              "--out-dir", str(tmp_path / f"out{len(list(tmp_path.iterdir()))}"), *flags])
    with pytest.raises(SystemExit, match="--lm-eval-include .*nowhere: no such folder"):
        forgetting("--lm-eval-tasks", "rwml_general_mc", "--lm-eval-include", str(tmp_path / "nowhere"))
    # a local task whose data file is gone: the error names the file
    local = tmp_path / "tasks"
    local.mkdir()
    for f in ("rwml_general.py", "rwml_general_gen.yaml"):
        (local / f).write_text((LM_EVAL_DIR / f).read_text())
    with pytest.raises(FileNotFoundError, match="rwml_general_gen.jsonl does not exist"):
        forgetting("--lm-eval-tasks", "rwml_general_gen", "--lm-eval-include", str(local))
    # a name neither lm-eval nor the folder knows (this one indexes lm-eval's own tasks: ~15 s)
    with pytest.raises(SystemExit, match="unknown task 'rwml_no_such_task': not in lm-eval .* nor in"):
        forgetting("--lm-eval-tasks", "rwml_general_mc,rwml_no_such_task", "--lm-eval-include", str(LM_EVAL_DIR))
