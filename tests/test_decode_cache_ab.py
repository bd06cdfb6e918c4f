"""benchmarks/decode_cache_ab.py: the cache-read A/B runs on a tiny student, gives the same texts both
ways and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_cache_ab.py"


def _load():
    return load_script(SCRIPT)


@pytest.mark.usefixtures("one_thread")
def test_decode_cache_ab_smoke(tiny_student_dir, tmp_path):
    rc = _load().main(["--student", str(tiny_student_dir), "--dtype", "float32", "--attention", "grouped",
                       "--prompt-format", "plain", "--rows", "3", "--new-tokens", "40", "--repeats", "1",
                       "--out", str(tmp_path)])
    report = json.loads((tmp_path / "decode-cache.json").read_text())
    assert rc == 0 and report["same_texts"] is True
    assert report["attention"] == "modecotd_grouped"
    assert all(len(v) == 1 and v[0] > 0 for v in report["runs_ms"].values())
    assert "same texts: yes" in (tmp_path / "decode-cache.md").read_text()


def test_decode_cache_ab_refuses_other_attention(tiny_student_dir):
    with pytest.raises(SystemExit):
        _load().main(["--student", str(tiny_student_dir), "--dtype", "float32", "--attention", "sdpa"])
