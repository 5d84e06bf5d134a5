"""run.sh --quick end to end with the tiny model on the fixture ALFWorld games: every stage's artifact and the
report appear, and a rerun skips every finished stage."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_pipeline_writes_every_artifact_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ALFWORLD_DATA": str(ROOT / "tests/fixtures/alfworld"), "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(ROOT / "run.sh"), "--quick", "--model", "tiny", "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    for path in ["collect/episodes.jsonl", "collect/triples_train.jsonl", "collect/stats.json",
                 "filter/filtered.jsonl", "filter/summary.json", "wm_sft/ckpt/latest", "rwml/ckpt/latest",
                 "rwml/metrics.jsonl", "policy/ckpt/latest", "rwml_policy/ckpt/latest",
                 "report/report.md", "report/curves.png", "report/weight_change.png"]:
        assert (out / path).exists(), path
    assert (out / "report/curves.png").stat().st_size > 1000
    for name in ["base", "wm_sft", "rwml", "policy", "rwml_policy"]:
        for what in ["valid_seen", "valid_unseen", "wm"]:
            assert json.loads((out / "eval" / name / what / "results.json").read_text())
    # RWML + policy RL starts from the RWML checkpoint, not from the base model
    assert json.loads((out / "rwml_policy/config.json").read_text())["model"] == str(out / "rwml")
    report = (out / "report/report.md").read_text()
    assert all(name in report for name in ["wm_sft", "rwml_policy"])

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") >= 6 + 5 * 3
