"""run.sh --quick end to end with the tiny model on the fixture ALFWorld games: every stage's artifact, the
one-process evaluation of all six arms and summary.json appear, every arm starts where it should, and a rerun
skips every finished stage."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("base", "wm_sft", "rwml", "policy", "wm_sft_policy", "rwml_policy", "il", "iwm", "sr", "gigpo", "rwml_gigpo",
        "echo", "dyna")
STAGES = ("collect", "heldout", "format", "filter", "wm_sft", "rwml", "policy", "wm_sft_policy", "rwml_policy",
          "gigpo", "rwml_gigpo", "echo", "dyna", "expert", "il", "iwm_wm", "iwm", "sr", "eval_wm", "eval_policy",
          "eval_ee", "eval_objectives", "eval_policy_wm")


@pytest.mark.slow
def test_quick_pipeline_writes_every_artifact_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ALFWORLD_DATA": str(ROOT / "tests/fixtures/alfworld"), "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(ROOT / "run.sh"), "--quick", "--all-arms", "--model", "tiny", "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    for path in ["collect/triples_train.jsonl", "collect/triples_val.jsonl", "heldout/triples_train.jsonl",
                 "format/episodes.jsonl", "filter/filtered.jsonl", "filter/summary.json", "wm_sft/ckpt/latest",
                 "rwml/ckpt/latest", "rwml/metrics.jsonl", "policy/ckpt/latest", "wm_sft_policy/ckpt/latest",
                 "rwml_policy/ckpt/latest", "report/report.md", "report/curves.png", "report/summary.json"]:
        assert (out / path).exists(), path
    # the cold start (the filter model) is where every arm starts; policy RL also starts from WM SFT and RWML
    config = {name: json.loads((out / name / "config.json").read_text())
              for name in ("wm_sft", "rwml", "policy", "wm_sft_policy", "rwml_policy", "gigpo", "rwml_gigpo", "echo",
                           "dyna")}
    assert config["wm_sft"]["model"] == config["rwml"]["model"] == config["policy"]["model"] == str(out / "filter")
    assert config["rwml_policy"]["model"] == str(out / "rwml")
    assert config["wm_sft"]["max_steps"] == config["rwml"]["max_steps"] == 8   # the world-model arms' steps match
    assert config["wm_sft_policy"]["model"] == str(out / "wm_sft")
    # Early Experience's arms: IL and SR from the cold start, IWM's imitation from its world-model stage
    ee = {name: json.loads((out / name / "config.json").read_text()) for name in ("il", "iwm_wm", "iwm", "sr")}
    assert ee["il"]["model"] == ee["iwm_wm"]["model"] == ee["sr"]["model"] == str(out / "filter")
    assert ee["iwm"]["model"] == str(out / "iwm_wm")
    assert ee["iwm_wm"]["triples"] == str(out / "expert/triples_alt.jsonl")
    assert ee["sr"]["reflections"] == ee["iwm_wm"]["triples"] and (out / "sr/rationales/rank0.jsonl").exists()
    # the policy-objective arms: GiGPO from the start and from RWML, ECHO and Dyna from the start
    assert config["gigpo"]["model"] == config["echo"]["model"] == config["dyna"]["model"] == str(out / "filter")
    assert config["rwml_gigpo"]["model"] == str(out / "rwml")
    assert config["gigpo"]["step_advantage"] == config["rwml_gigpo"]["step_advantage"] == "gigpo"
    assert config["echo"]["echo_coef"] == 0.1 and config["policy"]["step_advantage"] == "none"
    assert config["dyna"]["dyna_coef"] == 1.0 and config["policy"]["dyna_coef"] == 0.0
    # the preset drops zero-variance groups, except where GiGPO's step advantages or ECHO's loss live inside them
    assert config["policy"]["drop_zero_var"] and config["dyna"]["drop_zero_var"]
    assert not any(config[a]["drop_zero_var"] for a in ("gigpo", "rwml_gigpo", "echo"))
    # the miniature skips the too-easy rule: every triple is kept, and WM SFT and RWML train on all of them
    assert json.loads((out / "filter/summary.json").read_text())["k"] == 0
    # held-out world-model triples come from games of another split than the training ones
    train_tasks = {json.loads(line)["task_id"] for line in (out / "collect/triples.jsonl").open()}
    held_tasks = {json.loads(line)["task_id"] for line in (out / "heldout/triples.jsonl").open()}
    assert held_tasks and not train_tasks & held_tasks

    summary = json.loads((out / "report/summary.json").read_text())
    assert set(summary["runs"]) == set(ARMS)
    for arm in ARMS:
        assert "twx/test" in summary["runs"][arm]["agent"] and summary["runs"][arm]["forgetting"]
        acc = summary["runs"][arm]["wm_accuracy"]   # every arm's (--all-arms): the report plots it against success
        assert 0 <= acc["k"] <= acc["n"] and acc["ci95"][0] <= acc["ci95"][1]
        if arm != "base":
            assert 0 <= summary["runs"][arm]["weights_changed"] <= 1
        # Dyna saves after each of its 2 steps: its step-1 checkpoint is evaluated too (--checkpoints all)
        assert [c["step"] for c in summary["runs"][arm]["checkpoints"]] == ([1] if arm == "dyna" else [])
    assert (out / "report/wm_vs_success.png").exists()
    assert set(STAGES) <= set(summary["stages"]) and summary["wall_s"] >= sum(summary["stages"][s] for s in STAGES)
    assert all(name in (out / "report/report.md").read_text() for name in ARMS)

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == len(STAGES)
