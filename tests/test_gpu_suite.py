"""benchmarks/gpu_suite.py rehearsed on the CPU: every part runs its real code on tiny shapes and writes
the report a GPU run would, so the one-call GPU suite cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ["env", "tests", "kernels", "student", "train", "infer"]


def _suite(out: Path, *args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), "--out", str(out), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _module():
    return load_script(SUITE)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite") / "suite"
    t0 = time.perf_counter()
    res = _suite(out, "--rehearse")
    return out, res, time.perf_counter() - t0


def test_rehearsal_runs_every_part(rehearsal):
    out, res, seconds = rehearsal
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "suite.json").read_text())
    assert report["rehearse"] is True and report["ok"] is True
    assert report["command"].startswith("python benchmarks/gpu_suite.py") and "--rehearse" in report["command"]
    assert report["date"] and report["budget_s"] > 0 and report["seconds"] < report["budget_s"]
    assert report["env"]["device"] and report["env"]["versions"]["torch"] and report["env"]["versions"]["python"]
    assert [p["part"] for p in report["parts"]] == PARTS
    for p in report["parts"]:
        assert p["status"] == "ok" and p["rc"] == 0 and p["seconds"] <= p["timeout_s"], p
        assert p["summary"], p["part"]
        assert (out / p["log"]).is_file()
    md = (out / "suite.md").read_text()
    assert md.startswith("# GPU suite (CPU rehearsal)") and report["command"] in md
    for heading in ("## GPU tests", "## Kernel benchmark", "## Training", "## Inference"):
        assert heading in md
    assert seconds < 120, f"the rehearsal took {seconds:.0f} s"


def test_rehearsal_tests_part(rehearsal):
    out, _, _ = rehearsal
    summary = json.loads((out / "suite.json").read_text())["parts"][1]["summary"]
    # the rehearsal hides any GPU: the GPU files skip whole; the interpreter tests standing in pass
    assert summary["counts"] == {"file skipped": 2, "passed": 2} and not summary["failures"]
    assert summary["junit"]["tests"] >= 2 and summary["junit"]["failures"] == 0
    lines = [json.loads(x) for x in (out / "tests" / "tests.jsonl").read_text().splitlines()]
    assert {x["outcome"] for x in lines if x["when"] == "call"} == {"passed"}


def test_rehearsal_kernel_benchmark(rehearsal):
    out, _, _ = rehearsal
    report = json.loads((out / "kernels" / "kernels.json").read_text())
    assert report["complete"] is True and report["cases"] == 2
    rows = report["rows"]
    assert {r["mode"] for r in rows} == {"output", "weight"} and {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {"base", "torch", "loop"} <= {r["provider"] for r in rows}
    for r in rows:  # every provider measured, and the decode cases back to back too
        assert r["median_ms"] > 0 and r["wall_ms"] > 0, r
        assert r["graph_ms"] is None  # CUDA graphs need CUDA
    assert (out / "kernels" / "kernels.md").read_text().count("| tiny 64->96 |") == 4
    summary = json.loads((out / "kernels" / "part.json").read_text())["summary"]
    assert len(summary["decode"]) == len(rows) and len(summary["targets"]) >= 5


def test_rehearsal_train_and_infer(rehearsal):
    out, _, _ = rehearsal
    train = json.loads((out / "train" / "train-bench.json").read_text())
    assert train["ours"]["tokens_per_s"] > 0 and train["env"]["date"] and train["env"]["device"]
    infer = json.loads((out / "infer" / "infer.json").read_text())
    assert infer["providers"]["ours: mixed batch"]["tokens_per_s"] > 0 and infer["date"] and infer["device"]
    student = json.loads((out / "student" / "part.json").read_text())["summary"]
    assert student["config"]["num_hidden_layers"] == 2 and student["bytes"] > 0
    assert not list(out.rglob("*.safetensors"))  # the student lives outside the report and is removed


def test_real_student_shapes():
    # what the GPU run trains and serves: SmolLM2-135M's architecture
    from modecotd_engine.bench.common import SMOLLM2_135M

    assert {k: SMOLLM2_135M[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "vocab_size")} == dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152)


def test_a_failed_part_is_recorded_and_the_suite_goes_on(tmp_path):
    # train and infer without a student: both fail, each is recorded with its log, the run ends
    res = _suite(tmp_path / "suite", "--rehearse", "--only", "train,infer", "--student-dir",
                 str(tmp_path / "no-student"), timeout=120)
    assert res.returncode == 1
    report = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert [(p["part"], p["status"]) for p in report["parts"]] == [("train", "failed"), ("infer", "failed")]
    assert all("StudentError" in p["log_tail"] for p in report["parts"])
    assert "## train: failed" in (tmp_path / "suite" / "suite.md").read_text()


def test_out_of_time_parts_are_skipped(tmp_path):
    res = _suite(tmp_path / "suite", "--rehearse", "--budget", "1", timeout=60)
    assert res.returncode == 1
    report = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert [p["status"] for p in report["parts"]] == ["skipped (out of time)"] * len(PARTS)


def test_a_hung_part_is_killed(tmp_path):
    suite = _module()
    t0 = time.perf_counter()
    status, rc, seconds = suite._run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log.txt",
                                     1.0, dict(os.environ))
    assert status == "timeout" and rc is None and seconds < 10 and time.perf_counter() - t0 < 10
