"""`bench train` on a tiny student: rounds, per-round ratios and their medians, the report files."""

from __future__ import annotations

import json
import statistics

import pytest

from modecotd_engine.bench.train import run_train_bench

pytest.importorskip("peft")


def test_train_bench_rounds_and_medians(tiny_student_dir, tmp_path, one_thread):
    report = run_train_bench(tmp_path, student=str(tiny_student_dir), steps=3, batch_size=2, repeats=2,
                             dtype="float32")
    assert report["repeats"] == 2
    ours = report["ours"]
    assert len(ours["tokens_per_s_per_round"]) == 2 and all(v > 0 for v in ours["tokens_per_s_per_round"])
    assert ours["norm"] == "engine"
    labels = [r["label"] for r in report["peft_trainer"]]
    assert labels == ["PEFT + Trainer (transformers defaults)",
                      "PEFT + Trainer, given the engine's attention and RMSNorm"]
    stock, given = report["peft_trainer"]
    assert stock["norm"] == "transformers" and given["norm"] == "engine"
    for run in report["peft_trainer"]:
        ratios = [o / p for o, p in zip(ours["tokens_per_s_per_round"], run["tokens_per_s_per_round"])]
        assert run["speedup_per_round"] == pytest.approx(ratios)
        assert run["speedup"] == pytest.approx(statistics.median(ratios))
        assert set(run["final_loss_per_task"]) == set(ours["final_loss_per_task"])
    assert report["speedup"] == stock["speedup"]
    saved = json.loads((tmp_path / "train-bench.json").read_text())
    assert saved["speedup"] == pytest.approx(report["speedup"])
    md = (tmp_path / "train-bench.md").read_text()
    assert "median of 2 round(s)" in md and "--repeats 2" in md


def test_train_bench_rejects_zero_repeats(tmp_path):
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        run_train_bench(tmp_path, student=None, repeats=0)
