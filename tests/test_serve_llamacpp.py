"""The llama-server comparison script: a request's experts as llama-server's ``lora`` field, and a
clear failure when llama-server cannot start (llama.cpp itself is built outside the repository)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_llamacpp.py"


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


def test_lora_field_follows_the_adapter_order(script):
    names = ["expert0", "expert1", "expert2"]
    assert script.lora_field("expert1", names) == [{"id": 1, "scale": 1.0}]
    assert script.lora_field("expert2=0.6,expert0=0.4", names) == [{"id": 2, "scale": 0.6}, {"id": 0, "scale": 0.4}]
    with pytest.raises(ValueError):
        script.lora_field("nope", names)


def test_a_server_that_exits_is_reported(script, tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="llama-server exited with"):
        with script.llama_server("/bin/false", tmp_path / "m.gguf", [], slots=1, ctx_per_slot=64, threads=1, log=log):
            pass
