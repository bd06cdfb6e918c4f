"""benchmarks/shared_init_ab.py: geometry and held-out losses of a shared-A and an independent-A bank
on a tiny student. With exactly one A for every expert, weight composition IS output composition
((sum w B) A = sum w B A), so its cross terms are zero and both losses agree; independent A's make
them differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "shared_init_ab.py"
TASKS = ("alpha", "beta", "gamma")


def _bank(model, shared: bool, root: Path) -> Path:
    from modecotd_engine.engine.experts import ExpertBank

    bank = ExpertBank.create(model, list(TASKS), rank=4, alpha=8.0, seed=3, shared_init=shared)
    gen = torch.Generator().manual_seed(7)
    for m in bank.modules:  # the same B's in both banks: only A's initialisation differs
        bank.lora_b[m] = torch.randn(bank.lora_b[m].shape, generator=gen) * 0.3
    return bank.save(root / ("shared" if shared else "independent"))


def _data(root: Path) -> Path:
    d = root / "eval"
    d.mkdir()
    for i, t in enumerate(TASKS):
        recs = [{"input": f"Q: {i} plus {j}?\nA:", "output": f"{i} and {j} make {i + j}.\n\n-->\n\n{i + j} END"}
                for j in range(3)]
        (d / f"{t}.json").write_text(json.dumps(recs))
    return d


@pytest.mark.usefixtures("one_thread")
def test_shared_init_ab_report(tiny_student_dir, base_model, tmp_path):
    mod = load_script(SCRIPT)
    shared, independent = _bank(base_model, True, tmp_path), _bank(base_model, False, tmp_path)
    out = tmp_path / "out"
    rc = mod.main(["--bank", f"shared={shared}", "--bank", f"independent={independent}", "--data",
                   str(_data(tmp_path)), "--student", str(tiny_student_dir), "--dtype", "float32", "--limit", "2",
                   "--out", str(out)])
    r = json.loads((out / "ab.json").read_text())
    assert rc == 0 and set(r["banks"]) == {"shared", "independent"}
    s, ind = r["banks"]["shared"], r["banks"]["independent"]

    assert s["geometry"]["cos_a"] == pytest.approx(1.0, abs=1e-9)
    assert abs(ind["geometry"]["cos_a"]) < 0.3
    # one A: weight composition is output composition scaled by sum(w), (sum w B)(sum w A) = sum(w) sum w B A
    # (up to the gate's float32 rounding: w = 1/3 sums to 1 + 3e-8)
    for g, total in (("uniform", 1.0), ("own-heavy", 1.0), ("sum", 3.0)):
        assert s["geometry"]["weight_over_output"][g] == pytest.approx(total, abs=1e-6)
        assert s["geometry"]["weight_minus_output"][g] == pytest.approx(total - 1.0, abs=1e-6)
        assert ind["geometry"]["weight_minus_output"][g] > 0.1
    for t in TASKS:
        # w = 0 is the student whatever the bank
        assert s["loss"][t]["base"]["output"] == pytest.approx(ind["loss"][t]["base"]["output"], abs=1e-6)
        for g in ("uniform", "own-heavy"):  # sum(w) = 1: the two compositions are one model
            assert s["loss"][t][g]["weight"] == pytest.approx(s["loss"][t][g]["output"], abs=1e-5)
        assert abs(ind["loss"][t]["sum"]["weight"] - ind["loss"][t]["sum"]["output"]) > 1e-4
        assert s["loss"][t]["own"]["output"] != pytest.approx(s["loss"][t]["base"]["output"], abs=1e-4)
    md = (out / "ab.md").read_text()
    assert "| **mean** | sum |" in md and "cos(A_i, A_j)" in md


def test_shared_init_ab_names_a_missing_task(tiny_student_dir, base_model, tmp_path):
    mod = load_script(SCRIPT)
    shared = _bank(base_model, True, tmp_path)
    with pytest.raises(SystemExit, match="no expert for task"):
        mod.main(["--bank", f"shared={shared}", "--data", str(_data(tmp_path)), "--tasks", "alpha,delta",
                  "--student", str(tiny_student_dir), "--dtype", "float32", "--out", str(tmp_path / "o")])
