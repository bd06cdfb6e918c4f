"""`reproduce` on a tiny student and a tiny layout: every stage runs, the report has every system, and a
second run continues instead of starting over."""

from __future__ import annotations

import json
import random

import pytest
import torch

from modecotd_engine.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(rng, prompt_only=False):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    out = f"{a} plus {b} is {a + b}.\n\n-->\n\n{a + b} END"
    return {"input": f"Q: {a} + {b} = ?\nA:", "output": str(a + b) if prompt_only else out}


def _coin(rng, gold_only=False):
    n = rng.randint(0, 3)
    ans = "yes" if n % 2 == 0 else "no"
    return {"input": f"A coin is heads up. It is flipped {n} times. Is it still heads up?\nA:",
            "output": ans if gold_only else f"{n} flips.\n\n-->\n\n{ans} END"}


@pytest.fixture()
def layout(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "data"
    for sub in ("train", "learn", "dev-unseen"):
        (root / sub).mkdir(parents=True)
    for task in ("addsub", "multiarith"):
        train = [_record(rng) for _ in range(14)]
        for i, r in enumerate(train):
            r["input"] = f"{i}. {r['input']}"  # distinct inputs
        (root / "train" / f"{task}.json").write_text(json.dumps(train))
        shots = [train[-1]] + [_record(rng) for _ in range(2)]  # one shot is also the last train record
        (root / "learn" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shots))
    (root / "learn" / "coin_flip.jsonl").write_text("".join(json.dumps(_coin(rng)) + "\n" for _ in range(3)))
    (root / "dev-unseen" / "coin_flip.json").write_text(json.dumps([_coin(rng, True) for _ in range(5)]))
    return root


def test_reproduce_runs_every_stage_and_continues(layout, tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "--data", str(layout), "--out", str(out), "--student", str(tiny_student_dir),
            "--tasks", "addsub,multiarith", "--prompt-format", "plain", "--no-progress",
            "--set", "steps=3", "--set", "heldout=3", "--set", "eval_limit=2", "--set", "max_new_tokens=4",
            "--set", "budget=3", "--set", "finalists=2", "--set", "max_len=64", "--set", "batch_size=2"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task |"))
    for system in ("base", "multitask", "experts", "search-weight", "search-output", "uniform"):
        assert f" {system} |" in header, system  # the table names every system
    assert "- command: `modecotd-engine " in report and "- device" not in report and "device: CPU" in report
    assert "| coin_flip | no | 2 |" in report and "| addsub | yes | 2 |" in report  # 3 held out, 1 is a shot
    assert header.endswith("| constant answer | Fine-tune-CoT 250M |")
    base = json.loads((out / "eval" / "base" / "summary.json").read_text())["tasks"]
    coin = next(line for line in report.splitlines() if line.startswith("| coin_flip |"))
    assert coin.endswith(f"| {100 * base['coin_flip']['majority']:.1f} | 100.0 |")  # the majority of its 2 records
    assert (out / "report.png").stat().st_size > 0
    # held-out records are not trained on; unseen evaluation records never reach training or mixing
    held = json.loads((out / "data" / "eval" / "addsub.json").read_text())
    train = json.loads((out / "data" / "train" / "addsub.json").read_text())
    assert len(train) == 11 and not any(r in train for r in held)
    shot = json.loads((layout / "learn" / "addsub.jsonl").read_text().splitlines()[0])
    assert shot not in held and shot not in train  # mixing sees it: neither trained nor evaluated on
    assert not (out / "data" / "train" / "coin_flip.json").exists()
    mixture = json.loads((out / "mixtures" / "weight" / "coin_flip.json").read_text())
    assert mixture["info"]["shots"] == 3 and "finalists" in mixture["info"]
    summary = json.loads((out / "eval" / "experts" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"addsub", "multiarith"}
    times = json.loads((out / "stages.json").read_text())
    capsys.readouterr()

    assert main(argv) == 0  # a second run finds every stage done
    assert "[experts] done already" in capsys.readouterr().out
    assert json.loads((out / "stages.json").read_text()) == times

    # continuing with other settings would mix two runs in one report: refused, naming what changed
    assert main(argv + ["--set", "steps=4"]) == 2
    assert "steps: 3 -> 4" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["profile"]["steps"] == 3


def test_a_run_recorded_before_guided_answers_continues_without_them(tmp_path):
    from modecotd_engine.engine.reproduce import PROFILES, ReproduceConfig, _check_same_run
    from dataclasses import asdict

    cfg = ReproduceConfig(data="d", out=str(tmp_path))
    prof = cfg.resolved_profile()
    assert prof.guide_answers is True and PROFILES["full"].guide_answers is True  # new runs guide answers
    old = {"config": asdict(cfg), "profile": {k: v for k, v in asdict(prof).items() if k != "guide_answers"},
           "seen": [], "unseen": []}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old, default=str))
    kept = cfg.resolved_profile()
    assert kept.guide_answers is False  # as the run was made
    record = json.loads(json.dumps({"config": asdict(cfg), "profile": asdict(kept), "seen": [], "unseen": []},
                                   default=str))
    _check_same_run(path, record)  # the same settings: accepted
    # once recorded with the field, the run goes on with its value at the next continuation too
    path.write_text(json.dumps(record))
    assert cfg.resolved_profile().guide_answers is False
    path.write_text(json.dumps(old, default=str))
    asked = ReproduceConfig(data="d", out=str(tmp_path), overrides={"guide_answers": True}).resolved_profile()
    record["profile"]["guide_answers"] = asked.guide_answers  # --set guide_answers=true on the old run
    with pytest.raises(ValueError, match="guide_answers: False \\(recorded before the field\\) -> True"):
        _check_same_run(path, record)
    assert ReproduceConfig(data="d", out=str(tmp_path / "new")).resolved_profile().guide_answers is True  # a new run


def test_reproduce_train_cap_keeps_the_first_records(layout, tmp_path):
    from modecotd_engine.engine.reproduce import PROFILES, ReproduceConfig, _prepare_data, _read_layout
    from dataclasses import replace

    cfg = ReproduceConfig(data=str(layout), out=str(tmp_path / "o"), tasks=("addsub",), unseen=("coin_flip",))
    prof = replace(cfg.resolved_profile(), heldout=3, train_cap=5)
    _prepare_data(_read_layout(layout, cfg, prof), prof, tmp_path / "d")
    train = json.loads((tmp_path / "d" / "train" / "addsub.json").read_text())
    full = json.loads((layout / "train" / "addsub.json").read_text())
    assert train == full[:5]
    assert len(json.loads((tmp_path / "d" / "eval" / "addsub.json").read_text())) == 2  # 3 held out, 1 a shot
    assert PROFILES["cpu"].train_cap == 0


def test_reproduce_refuses_a_bad_layout(tmp_path, tiny_student_dir):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no learn/ directory"):
        from modecotd_engine.engine.reproduce import ReproduceConfig, reproduce

        reproduce(ReproduceConfig(data=str(tmp_path), out=str(tmp_path / "o"), student=str(tiny_student_dir)))
    assert main(["reproduce", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "nope=1"]) == 2


def test_set_parses_each_profile_field_type():
    from modecotd_engine.cli.reproduce import _overrides

    got = _overrides(["steps=3", "lr=5e-4", "targets=q_proj,v_proj", "guide_answers=true"])
    assert got == {"steps": 3, "lr": 5e-4, "targets": ("q_proj", "v_proj"), "guide_answers": True}
    assert _overrides(["guide_answers=0"]) == {"guide_answers": False}
    with pytest.raises(ValueError, match="guide_answers takes true or false"):
        _overrides(["guide_answers=maybe"])


def test_reproduce_skip_leaves_systems_out(layout, tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "--data", str(layout), "--out", str(out), "--student", str(tiny_student_dir),
            "--tasks", "addsub", "--prompt-format", "plain", "--no-progress", "--skip", "multitask,search-output",
            "--set", "steps=2", "--set", "heldout=3", "--set", "eval_limit=2", "--set", "max_new_tokens=4",
            "--set", "budget=2", "--set", "finalists=2", "--set", "max_len=64", "--set", "batch_size=2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[multitask] skipped" in printed and "[eval-search-output] skipped" in printed
    assert not (out / "multitask").exists() and not (out / "mixtures" / "output").exists()
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| task |"))
    assert " search-weight |" in header and " multitask |" not in header and " search-output |" not in header
    assert main(argv[:-16] + ["--skip", "nope"] + argv[-16:]) == 2
    assert "cannot skip ['nope']" in capsys.readouterr().err


def test_reproduce_select_chooses_each_experts_step_on_validation_records(layout, tiny_student_dir, tmp_path, capsys):
    from modecotd_engine.engine.experts import ExpertBank

    out = tmp_path / "run"
    argv = ["reproduce", "--data", str(layout), "--out", str(out), "--student", str(tiny_student_dir),
            "--tasks", "addsub,multiarith", "--prompt-format", "plain", "--no-progress",
            "--skip", "multitask,search-weight,search-output,uniform",
            "--set", "steps=4", "--set", "snapshots=2", "--set", "val=3", "--set", "heldout=3",
            "--set", "eval_limit=2", "--set", "max_new_tokens=4", "--set", "max_len=64", "--set", "batch_size=2"]
    assert main(argv) == 0
    assert "[select]" in capsys.readouterr().out
    # validation records: the 3 before the held-out ones, neither trained nor evaluated on
    full = json.loads((layout / "train" / "addsub.json").read_text())
    val = json.loads((out / "data" / "val" / "addsub.json").read_text())
    train = json.loads((out / "data" / "train" / "addsub.json").read_text())
    held = json.loads((out / "data" / "eval" / "addsub.json").read_text())
    assert val == full[-6:-3] and train == full[:-6] and not any(r in held for r in val)
    assert sorted(p.name for p in (out / "experts" / "snapshots").iterdir()) == ["step-0000002", "step-0000004"]
    sel = json.loads((out / "experts" / "selection.json").read_text())
    assert set(sel["chosen"]) == {"addsub", "multiarith"} and set(sel["chosen"].values()) <= {2, 4}
    for t, step in sel["chosen"].items():  # the chosen step has the best validation accuracy, ties the later
        accs = {int(k): v for k, v in sel["val_accuracy"][t].items()}
        assert set(accs) == {2, 4} and accs[step] == max(accs.values())
        assert step == 4 or accs[2] > accs[4]
        summ = json.loads((out / "select" / f"step-{step:07d}" / "summary.json").read_text())
        assert summ["tasks"][t]["n"] == 3 and summ["tasks"][t]["accuracy"] == accs[step]
    # the later stages evaluate the chosen experts: each one's tensors are those of its step
    chosen = ExpertBank.load(out / "experts" / "selected")
    for t, step in sel["chosen"].items():
        src = ExpertBank.load(out / "experts" / ("bank" if step == 4 else "snapshots/step-0000002"))
        i = chosen.index(t)
        for m in chosen.modules:
            assert torch.equal(chosen.lora_a[m][i], src.lora_a[m][i])
            assert torch.equal(chosen.lora_b[m][i], src.lora_b[m][i])
    assert "training step, chosen by accuracy" in (out / "report.md").read_text()


def test_compose_bank_takes_each_expert_from_its_bank():
    from modecotd_engine.engine.experts import ExpertBank
    from modecotd_engine.engine.reproduce import compose_bank

    def bank(fill):
        g = torch.Generator().manual_seed(fill)
        return ExpertBank(names=["a", "b", "c"], rank=2, alpha=4.0, targets=("q",), modules={"m": (5, 3)},
                          lora_a={"m": torch.randn(3, 2, 5, generator=g)},
                          lora_b={"m": torch.randn(3, 3, 2, generator=g)})

    banks = {10: bank(1), 20: bank(2), 30: bank(3)}
    out = compose_bank(banks, {"a": 10, "b": 20})
    for i, key in enumerate((10, 20, 30)):  # c is not chosen: from the last bank
        assert torch.equal(out.lora_a["m"][i], banks[key].lora_a["m"][i])
        assert torch.equal(out.lora_b["m"][i], banks[key].lora_b["m"][i])
    assert torch.equal(banks[30].lora_a["m"], bank(3).lora_a["m"])  # the inputs are not changed
    other = bank(4)
    other.names = ["a", "b", "d"]
    with pytest.raises(ValueError, match="other experts"):
        compose_bank({1: banks[10], 2: other}, {"a": 1})
