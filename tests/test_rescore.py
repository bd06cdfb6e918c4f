"""benchmarks/rescore.py: saved generations scored again with the current extraction, nothing generated."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rescore.py"


def _load():
    return load_script(SCRIPT)


def test_rescore_updates_summary_and_keeps_the_first_version(tmp_path):
    q = "Meadow voles consume Answer choices: (A) producers, (B) apex predators."
    preds = [{"index": 0, "input": q, "gold": "A", "prediction": None, "generation": "They eat producers.",
              "correct": False, "num_tokens": 5, "finish_reason": "eos"},
             {"index": 1, "input": q, "gold": "B", "prediction": "A", "generation": "(A)", "correct": False,
              "num_tokens": 3, "finish_reason": "eos"}]
    d = tmp_path / "base"
    (d / "predictions").mkdir(parents=True)
    (d / "predictions" / "openbook_qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    row = {"task": "openbook_qa", "task_type": "choice", "n": 2, "correct": 0, "accuracy": 0.0, "unextracted": 1,
           "seen": False, "no_answer": 1, "generated_tokens": 8}
    (d / "summary.json").write_text(json.dumps({"system": "base", "tasks": {"openbook_qa": row}}))
    assert _load().rescore_eval_dir(d) == {"openbook_qa": (0.0, 0.5)}
    new = json.loads((d / "summary.json").read_text())["tasks"]["openbook_qa"]
    assert new["correct"] == 1 and new["no_answer"] == 0 and new["unextracted"] == 0 and new["seen"] is False
    assert json.loads((d / "summary.before-rescore.json").read_text())["tasks"]["openbook_qa"] == row
    again = [json.loads(line) for line in (d / "predictions" / "openbook_qa.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in again] == ["A", "A"] and [p["correct"] for p in again] == [True, False]
