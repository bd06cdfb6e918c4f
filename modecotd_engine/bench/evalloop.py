"""Evaluation throughput: continuous batching against fixed batches that drain, on the same records.

Both runs call ``evaluate_many`` (what ``eval`` and ``reproduce`` call) with the same gates and
decoding settings; only ``GenerationConfig.continuous`` differs. Greedy decoding, so both must write
the same answers; the report says whether they did. Figures: wall time, generated tokens per second,
and the mean number of rows per decode forward (how full the batch stayed).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path


from .common import device_name, versions
from ..engine.atomic import atomic_write_text


def run_eval_bench(out_dir: Path, *, bank: str, data: str, tasks: str = "", limit: int = 30,
                   max_new_tokens: int = 160, batch_size: int = 32, student: str | None = None,
                   dtype: str = "auto") -> dict:
    """Evaluate ``limit`` records of each task of ``data`` with its own expert (the bank's expert named
    like the task), once with fixed draining batches and once with continuous batching."""
    from ..cli.eval import load_eval_data
    from ..engine.evaluate import evaluate_many
    from ..engine.experts import ExpertBank
    from ..engine.generate import GenerationConfig
    from ..engine.inject import inject_experts
    from ..engine.student import load_student

    st = load_student(student, dtype=dtype)
    b = ExpertBank.load(bank, student=st)
    handle = inject_experts(st.model, b)
    records = load_eval_data(data, tasks=tasks, limit=limit)
    gates = {t: (b.weights_vector(t) if t in b.names else None) for t in records}
    base = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_format=b.prompt_format,
                            stop_after_answer=True, stop_on_loop=True)
    runs = {}
    for label, continuous in (("fixed batches (drain)", False), ("continuous batching", True)):
        t0 = time.perf_counter()
        res = evaluate_many(st.model, st.tokenizer, records, handle=handle, gates=gates,
                            config=replace(base, continuous=continuous))
        wall = time.perf_counter() - t0
        tokens = sum(p["num_tokens"] for r in res.values() for p in r.predictions)
        runs[label] = {"wall_s": round(wall, 2), "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                       "accuracy": {t: r.accuracy for t, r in res.items()},
                       "predictions": [p["prediction"] for r in res.values() for p in r.predictions]}
    (old, new) = runs.values()
    same = old["predictions"] == new["predictions"]
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": device_name(st.device), **versions(), "student": str(st.path), "dtype": str(st.dtype),
              "bank": bank, "data": data, "records": sum(len(v) for v in records.values()), "limit": limit,
              "max_new_tokens": max_new_tokens, "batch_size": batch_size, "same_predictions": same,
              "speedup": round(new["tokens_per_s"] / old["tokens_per_s"], 2),
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in runs.items()}}
    lines = ["# Evaluation loop: continuous batching vs fixed batches", "",
             f"{report['date']}, {report['device']}, torch {report['torch']}, transformers {report['transformers']}; "
             f"student {st.path.name} ({st.dtype}); {report['records']} records ({limit} per task, each task's own "
             f"expert), greedy, at most {max_new_tokens} new tokens, batch {batch_size}", "",
             "| loop | wall (s) | generated tokens | tokens/s |", "|---|---:|---:|---:|"]
    for k, v in runs.items():
        lines.append(f"| {k} | {v['wall_s']:.1f} | {v['generated_tokens']} | {v['tokens_per_s']:.1f} |")
    lines += ["", f"speed-up: {report['speedup']:.2f}x tokens/s; same predictions: {'yes' if same else 'NO'}", "",
              f"Command: `modecotd-engine bench eval --bank {bank} --data {data} --limit {limit} "
              f"--max-new-tokens {max_new_tokens} --batch-size {batch_size} --out DIR`"]
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "eval-loop.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "eval-loop.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
