"""Score saved generations again with the current answer extraction, without generating anything.

    python benchmarks/rescore.py RUN_DIR [RUN_DIR ...]

A RUN_DIR is a `reproduce` output directory (every ``eval/<system>/`` in it is re-scored and
``report.md`` / ``report.png`` are written again) or one evaluation directory with ``predictions/``
and ``summary.json`` (what `reproduce` writes per system). Each re-scored ``summary.json`` keeps its
first version beside it as ``summary.before-rescore.json``; predictions are rewritten with the new
answers. Used when the extraction rules change (docs/real-data.md says which figures were re-scored).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from modecotd_engine.engine.atomic import atomic_write_text
from modecotd_engine.engine.evaluate import score_generations


def rescore_eval_dir(d: Path) -> dict[str, tuple[float, float]]:
    """Re-score every ``predictions/<task>.jsonl`` of ``d``; returns task -> (old, new) accuracy."""
    summary = json.loads((d / "summary.json").read_text())
    backup = d / "summary.before-rescore.json"
    if not backup.exists():
        atomic_write_text(backup, json.dumps(summary, indent=2) + "\n")
    changes = {}
    for task, row in summary["tasks"].items():
        path = d / "predictions" / f"{task}.jsonl"
        preds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if any("sample_answers" in p for p in preds):
            raise ValueError(f"{path}: majority-vote predictions are not re-scored by this script")
        records = [{"input": p["input"], "output": p["gold"]} for p in preds]
        res = score_generations(task, row["task_type"], records, [p["gold"] for p in preds],
                                [p["generation"] for p in preds], [p["num_tokens"] for p in preds],
                                [p["finish_reason"] for p in preds])
        changes[task] = (row["accuracy"], res.accuracy)
        row.update(res.summary(), no_answer=res.unextracted)
        atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in res.predictions))
    atomic_write_text(d / "summary.json", json.dumps(summary, indent=2) + "\n")
    return changes


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for arg in map(Path, argv):
        dirs = sorted(p.parent for p in (arg / "eval").glob("*/summary.json")) if (arg / "eval").is_dir() else [arg]
        for d in dirs:
            for task, (old, new) in rescore_eval_dir(d).items():
                if old != new:
                    print(f"{d.name} {task}: {100 * old:.1f} -> {100 * new:.1f}")
        if (arg / "config.json").exists() and (arg / "eval").is_dir():
            from modecotd_engine.engine.reproduce import write_report

            cfg = json.loads((arg / "config.json").read_text())
            times = json.loads((arg / "stages.json").read_text()) if (arg / "stages.json").exists() else {}
            report = arg / "report.md"
            header = [line for line in report.read_text().splitlines() if line.startswith("- ")][:3] \
                if report.exists() else []
            write_report(arg, {"seen": cfg["seen"], "unseen": cfg["unseen"]}, times, header=header)
            print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
