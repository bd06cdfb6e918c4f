"""The command line: every command has a useful --help; bad input ends with a message, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modecotd_engine.cli.main import _COMMANDS, build_parser, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in _COMMANDS:
        assert f"    {name}" in out


@pytest.mark.parametrize("command", _COMMANDS)
def test_each_command_help_explains_every_flag(command, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    parsers = [sub]
    for action in sub._actions:  # nested subcommands (data builtin, experts show, bench kernels, ...)
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{p.prog} {action.option_strings} has no help text"


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "modecotd_engine.cli.main", "--version"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "modecotd-engine" in res.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_bad_student_path_is_a_clean_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["train", "--student", str(missing), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert str(missing) in err and "Traceback" not in err


def test_experts_cli_show_rename_export(tiny_student_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from modecotd_engine.engine.experts import ExpertBank

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    bank = ExpertBank.create(model, ["a", "b"], rank=2, alpha=4)
    bank.save(tmp_path / "bank")
    assert main(["experts", "show", "--bank", str(tmp_path / "bank")]) == 0
    assert "[1] b" in capsys.readouterr().out
    assert main(["experts", "rename", "--bank", str(tmp_path / "bank"), "b", "bee"]) == 0
    assert ExpertBank.load(tmp_path / "bank").names == ["a", "bee"]
    assert main(["experts", "export-peft", "--bank", str(tmp_path / "bank"), "--experts", "a=0.5,bee=0.5",
                 "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"
    assert main(["experts", "remove", "--bank", str(tmp_path / "bank"), "zzz"]) == 2
    assert "unknown expert 'zzz'" in capsys.readouterr().err
    # the exported mixture comes back in as a third expert, then the first one is removed
    assert main(["experts", "import-peft", "--bank", str(tmp_path / "bank"), "--adapter", str(tmp_path / "peft"),
                 "--name", "merged"]) == 0
    assert ExpertBank.load(tmp_path / "bank").names == ["a", "bee", "merged"]
    assert main(["experts", "remove", "--bank", str(tmp_path / "bank"), "a"]) == 0
    assert ExpertBank.load(tmp_path / "bank").names == ["bee", "merged"]
    assert torch.is_tensor(ExpertBank.load(tmp_path / "bank").lora_a[next(iter(bank.modules))])
