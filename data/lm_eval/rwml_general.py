"""Loader and scorer of the local lm-eval tasks in this folder (evaluate.py --lm-eval-include data/lm_eval). The
loader reads the task's JSONL beside this file, so the tasks run offline from any working directory (a YAML's
`data_files` would be resolved against the working directory instead)."""
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_file: str, **_metadata):
    """-> DatasetDict {"test": the rows of HERE/data_file}; lm-eval passes the task's metadata too (ignored)."""
    import datasets
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task data {path} does not exist")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def contains(doc: dict, results: list[str]) -> dict:
    """lm-eval process_results: 1 when the greedy reply holds the answer as a whole word (case-insensitive), as
    the forgetting probe checks its answers: chat models answer in a sentence ("7 + 8 = 15"), where exact match
    would score 0. "15" is in "It is 15." but not in "115"."""
    found = re.search(rf"(?<!\w){re.escape(doc['answer'].lower())}(?!\w)", results[0].lower())
    return {"contains": float(found is not None)}
