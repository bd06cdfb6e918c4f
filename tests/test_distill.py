"""The distillation loop on a tiny student: outputs, learning, checkpoints, SIGKILL resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modecotd_engine.engine.distill import TrainConfig, _latest_checkpoint, lr_at, train
from modecotd_engine.engine.experts import ExpertBank


def write_tasks(root: Path, n: int = 24) -> Path:
    """Two short tasks in the training format (rationale, '-->' line, answer, END)."""
    root.mkdir(parents=True, exist_ok=True)
    add, rev = [], []
    for i in range(n):
        a, b = i % 7 + 1, (3 * i) % 5 + 1
        add.append({"input": f"Q: {a}+{b}\nA:", "output": f"{a} + {b} = {a + b}.\n\n-->\n\n{a + b} END"})
        w = "abcdefg"[i % 7] + "xyz"[i % 3]
        rev.append({"input": f"Q: reverse {w}\nA:", "output": f"{w} reversed is {w[::-1]}.\n\n-->\n\n{w[::-1]} END"})
    (root / "add.json").write_text(json.dumps(add))
    (root / "rev.jsonl").write_text("\n".join(json.dumps(r) for r in rev) + "\n")
    return root


def small_cfg(student: Path, data: Path, out: Path, **over) -> TrainConfig:
    base = dict(student=str(student), data=str(data), out=str(out), steps=12, batch_size=4, rank=4, alpha=8,
                lr=5e-3, warmup=2, save_every=4, n_eval=0, max_len=64, progress=False, seed=0,
                dtype="float32")
    base.update(over)
    return TrainConfig(**base)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)


def test_train_learns_and_writes_everything(tiny_student_dir, tmp_path):
    data = write_tasks(tmp_path / "data")
    # every Linear carries experts here: a random tiny student's output is near-uniform, and attention-only
    # LoRA moves it slowly
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    cfg = small_cfg(tiny_student_dir, data, tmp_path / "run", steps=30, save_every=10, lr=1e-2, targets=targets)
    res = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert {"loss", "task_loss", "lr", "tokens_per_s", "peak_mem_mb", "grad_norm"} <= set(lines[0])
    first = sum(r["loss"] for r in lines[:3]) / 3
    last = sum(r["loss"] for r in lines[-3:]) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    bank = ExpertBank.load(res.bank_dir)
    assert bank.names == ["add", "rev"]
    for i in range(2):  # both experts were trained (B starts at zero)
        assert any(bank.lora_b[m][i].abs().sum() > 0 for m in bank.modules)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == ["step-0000020", "step-0000030"]


def test_a_step_moves_only_the_experts_of_its_tasks(tiny_student_dir, tmp_path):
    """Each batch holds one task: after a step, the other expert is bit-identical (weights), even
    though AdamW's momentum would otherwise keep moving it."""
    data = write_tasks(tmp_path / "data")
    res1 = train(small_cfg(tiny_student_dir, data, tmp_path / "r1", steps=1))
    res3 = train(small_cfg(tiny_student_dir, data, tmp_path / "r3", steps=3))
    b1, b3 = ExpertBank.load(res1.bank_dir), ExpertBank.load(res3.bank_dir)
    touched = [i for i in range(2) if any(b1.lora_b[m][i].abs().sum() > 0 for m in b1.modules)]
    assert len(touched) == 1  # B starts at zero: only the first batch's expert moved
    lines = [json.loads(x) for x in (tmp_path / "r3" / "metrics.jsonl").read_text().splitlines()]
    tasks = [next(iter(r["task_loss"])) for r in lines]
    for i, name in enumerate(b3.names):
        if name not in tasks:  # an expert whose task never came up is exactly its initial value
            assert all(torch.count_nonzero(b3.lora_b[m][i]) == 0 for m in b3.modules)
    # an expert idle after its first step keeps the weights of that step
    first = b1.names[touched[0]]
    if tasks[1:] and first not in tasks[1:]:
        for m in b1.modules:
            assert torch.equal(b3.lora_a[m][touched[0]], b1.lora_a[m][touched[0]])
            assert torch.equal(b3.lora_b[m][touched[0]], b1.lora_b[m][touched[0]])


def test_train_step_leaves_idle_experts_bit_identical(tiny_student_dir, tmp_path):
    """Inside the loop: at every step the experts absent from its batches keep their exact weights
    (AdamW moments would move them otherwise), and the present ones move."""
    from modecotd_engine.engine.data import BatchPlan, read_task_dir, tokenize_records
    from modecotd_engine.engine.distill import LossModule, train_step
    from modecotd_engine.engine.inject import inject_experts
    from modecotd_engine.engine.optim import ExpertAdamW
    from modecotd_engine.engine.student import load_student

    st = load_student(tiny_student_dir, dtype="float32")
    files = read_task_dir(write_tasks(tmp_path / "data"))
    names = sorted(files)
    examples = {n: tokenize_records(files[n].records, st.tokenizer, task=n, max_len=64)[0] for n in names}
    plan = BatchPlan(examples, batch_size=4, seed=0, task_index={n: i for i, n in enumerate(names)},
                     pad_id=st.tokenizer.pad_token_id)
    bank = ExpertBank.create(st.model, names, rank=4, alpha=8)
    handle = inject_experts(st.model, bank, trainable=True)
    params = handle.lora_parameters()
    opt = ExpertAdamW(params, len(names), lr=5e-3)
    loss_module = LossModule(st.model)
    idle_seen = 0
    for step in range(8):
        before = {m: (bank.lora_a[m].detach().clone(), bank.lora_b[m].detach().clone()) for m in bank.modules}
        batch = plan.batch(step)
        active = int(batch.task_ids[0])
        stats = train_step(loss_module, handle, opt, params, [batch], names, lr=5e-3, clip=1.0,
                           device=torch.device("cpu"))
        assert set(stats.task_loss_sum) == {names[active]} and stats.tokens == batch.num_tokens
        for e in range(len(names)):
            same = all(torch.equal(bank.lora_a[m][e], before[m][0][e]) and torch.equal(bank.lora_b[m][e], before[m][1][e])
                       for m in bank.modules)
            assert same == (e != active), (step, e)
            idle_seen += e != active and step > 0
    assert idle_seen  # the idle branch was taken after experts had moments


def test_existing_run_needs_resume(tiny_student_dir, tmp_path):
    data = write_tasks(tmp_path / "data")
    train(small_cfg(tiny_student_dir, data, tmp_path / "run", steps=4))
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_cfg(tiny_student_dir, data, tmp_path / "run", steps=4))
    with pytest.raises(ValueError, match="settings differ.*lr"):
        train(small_cfg(tiny_student_dir, data, tmp_path / "run", steps=4, lr=1e-3, resume=True))


def test_resume_equals_uninterrupted_in_process(tiny_student_dir, tmp_path):
    data = write_tasks(tmp_path / "data")
    full = train(small_cfg(tiny_student_dir, data, tmp_path / "full"))
    # stop after step 8 by training a 'shorter' prefix is not the same schedule, so cut the run instead:
    part = tmp_path / "part"
    train(small_cfg(tiny_student_dir, data, part))
    import shutil

    shutil.rmtree(part / "bank")
    for p in (part / "checkpoints").glob("step-*"):
        if p.name != "step-0000008":
            shutil.rmtree(p)
    (part / "checkpoints" / "latest").write_text("step-0000008\n")
    resumed = train(small_cfg(tiny_student_dir, data, part, resume=True))
    a, b = ExpertBank.load(full.bank_dir), ExpertBank.load(resumed.bank_dir)
    for m in a.modules:
        assert torch.equal(a.lora_a[m], b.lora_a[m]) and torch.equal(a.lora_b[m], b.lora_b[m])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "modecotd_engine.cli.main", "train", *args]


def test_sigkill_then_resume_matches_uninterrupted(tiny_student_dir, tmp_path):
    data = write_tasks(tmp_path / "data", n=40)
    common = ["--student", str(tiny_student_dir), "--data", str(data), "--steps", "60", "--batch-size", "4",
              "--rank", "4", "--lr", "5e-3", "--warmup", "2", "--save-every", "5", "--n-eval", "0",
              "--max-len", "64", "--no-progress", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = subprocess.run(_cli(*common, "--out", str(tmp_path / "ref")), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(run)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and _latest_checkpoint(run / "checkpoints") is None:
        time.sleep(0.005)
    time.sleep(0.05)  # somewhere inside a later step (possibly a checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "bank").exists(), "the run finished before it could be killed"
    ckpt = _latest_checkpoint(run / "checkpoints")
    assert ckpt is not None

    res = subprocess.run(_cli(*common, "--out", str(run), "--resume"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a, b = ExpertBank.load(tmp_path / "ref" / "bank"), ExpertBank.load(run / "bank")
    for m in a.modules:
        torch.testing.assert_close(b.lora_a[m], a.lora_a[m], rtol=0, atol=0)
        torch.testing.assert_close(b.lora_b[m], a.lora_b[m], rtol=0, atol=0)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # steps the killed process logged after its last checkpoint are logged once, by the resumed run
    assert [x["step"] for x in lines] == list(range(1, 61))


def test_metrics_after_resume_keep_only_checkpointed_steps(tmp_path):
    from modecotd_engine.engine.distill import _keep_metrics_before

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 9)))
    _keep_metrics_before(path, 5)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    _keep_metrics_before(path, 0)
    assert path.read_text() == ""


def test_chat_format_and_shared_init_reach_the_bank(tiny_student_dir, tmp_path):
    from transformers import AutoTokenizer

    from modecotd_engine.engine.data import format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_student_dir)
    student = tmp_path / "chat_student"
    import shutil

    shutil.copytree(tiny_student_dir, student)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(student)
    data = write_tasks(tmp_path / "data", n=12)
    res = train(small_cfg(student, data, tmp_path / "run", steps=3, prompt_format="chat", n_eval=2,
                          eval_max_new_tokens=4))
    bank = ExpertBank.load(res.bank_dir)
    assert bank.prompt_format == "chat"
    # the eval generations were prompted in the same format as training
    pred = json.loads((tmp_path / "run" / "predictions-after" / f"{bank.names[0]}.jsonl").read_text().splitlines()[0])
    assert format_prompt(tok, pred["input"], "chat").startswith("<|user|>")
    ckpt = json.loads((_latest_checkpoint(tmp_path / "run" / "checkpoints") / "trainer.json").read_text())
    assert ckpt["config"]["prompt_format"] == "chat" and ckpt["config"]["shared_init"] is True


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_two_process_ddp_matches_single_process(tiny_student_dir, tmp_path):
    data = write_tasks(tmp_path / "data")
    common = ["--student", str(tiny_student_dir), "--data", str(data), "--steps", "6", "--batch-size", "4",
              "--grad-accum", "2", "--rank", "4", "--lr", "5e-3", "--warmup", "2", "--n-eval", "0",
              "--max-len", "64", "--no-progress", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(_cli(*common, "--out", str(tmp_path / "single")), env=env, capture_output=True,
                            text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "modecotd_engine.cli.main", "train", *common, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2  # two ranks trained
    a, b = ExpertBank.load(tmp_path / "single" / "bank"), ExpertBank.load(tmp_path / "ddp" / "bank")
    for m in a.modules:
        torch.testing.assert_close(b.lora_a[m], a.lora_a[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.lora_b[m], a.lora_b[m], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the default path, as users run it
def test_default_path_builtin_tasks_bf16_grouped_attention(tiny_student_dir, tmp_path, capsys):
    """`train` without --data: built-in tasks written into the run, bf16 student with the engine's
    grouped attention where the CPU has native bf16, before/after evaluation and its files."""
    from modecotd_engine.cli.main import main
    from modecotd_engine.engine.student import cpu_has_native_bf16

    out = tmp_path / "run"
    argv = ["train", "--student", str(tiny_student_dir), "--out", str(out), "--steps", "4", "--batch-size", "2",
            "--grad-accum", "2", "--n-train", "8", "--n-eval", "2", "--eval-max-new-tokens", "4",
            "--tasks", "word_math,coin_flips", "--rank", "2", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    if cpu_has_native_bf16():
        assert "torch.bfloat16 on cpu, attention modecotd_grouped" in printed
    written = sorted(p.name for p in (out / "data" / "train").iterdir())
    assert {"word_math.jsonl", "coin_flips.jsonl"} <= set(written)  # the built-in tasks, as files
    assert {"word_math.jsonl", "coin_flips.jsonl"} <= {p.name for p in (out / "data" / "eval").iterdir()}
    acc = json.loads((out / "accuracy.json").read_text())
    assert set(acc["before"]) == set(acc["after"]) == {"word_math", "coin_flips"}
    assert "| **mean** |" in (out / "accuracy.md").read_text()
    for label in ("before", "after"):
        assert len((out / f"predictions-{label}" / "word_math.jsonl").read_text().splitlines()) == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(x["tokens"] > 0 for x in lines)
    assert ExpertBank.load(out / "bank").names == ["coin_flips", "word_math"]

    # --no-eval-before: only the after table is measured
    out2 = tmp_path / "run2"
    assert main(argv[:4] + [str(out2)] + argv[5:] + ["--no-eval-before"]) == 0
    assert json.loads((out2 / "accuracy.json").read_text())["before"] == {}
    assert not (out2 / "predictions-before").exists()
    # an unknown task is refused, naming what exists
    assert main(argv[:4] + [str(tmp_path / "run3")] + argv[5:-3] + ["--tasks", "nope", "--no-progress"]) == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err


def test_grad_accum_splits_one_step_exactly(tiny_student_dir, tmp_path):
    """One step over 4 examples, as one micro-batch or as two of 2: the loss is one token-mean over
    the whole step, so the experts after it agree (float64 student, up to summation order)."""
    from modecotd_engine.engine.data import collate, read_task_dir, tokenize_records
    from modecotd_engine.engine.distill import LossModule, train_step
    from modecotd_engine.engine.inject import inject_experts
    from modecotd_engine.engine.optim import ExpertAdamW
    from modecotd_engine.engine.student import load_student

    st = load_student(tiny_student_dir, dtype="float32")
    st.model.double()
    files = read_task_dir(write_tasks(tmp_path / "data"))
    index = {n: i for i, n in enumerate(sorted(files))}
    ex = tokenize_records(files["add"].records, st.tokenizer, task="add", max_len=64)[0]
    ex = sorted(ex[:4], key=len)  # different lengths: the halves pad differently from the whole
    pad = st.tokenizer.pad_token_id
    results = []
    for micro in ([collate(ex, index, pad)], [collate(ex[:2], index, pad), collate(ex[2:], index, pad)]):
        bank = ExpertBank.create(st.model, sorted(files), rank=4, alpha=8, dtype=torch.float64)
        for m in bank.modules:  # non-zero B, so dA is not zero either
            bank.lora_b[m].copy_(torch.randn(bank.lora_b[m].shape, generator=torch.Generator().manual_seed(1)))
        handle = inject_experts(st.model, bank, trainable=True)
        params = handle.lora_parameters()
        opt = ExpertAdamW(params, len(index), lr=1e-2)
        stats = train_step(LossModule(st.model), handle, opt, params, micro, sorted(files), lr=1e-2, clip=1e9,
                           device=torch.device("cpu"))
        results.append((bank, float(stats.grad_norm)))
        handle.remove()
    (a, norm_a), (b, norm_b) = results
    assert norm_a == pytest.approx(norm_b, rel=1e-12)
    for m in a.modules:
        torch.testing.assert_close(b.lora_a[m], a.lora_a[m], rtol=0, atol=1e-12)
        torch.testing.assert_close(b.lora_b[m], a.lora_b[m], rtol=0, atol=1e-12)


@pytest.mark.parametrize("policy", ["drop", "keep", "error"])
def test_missing_marker_policy(tiny_student_dir, tmp_path, policy, capsys):
    from modecotd_engine.cli.main import main

    data = write_tasks(tmp_path / "data", n=10)
    recs = json.loads((data / "add.json").read_text())
    recs[0]["output"] = "no marker here END"
    (data / "add.json").write_text(json.dumps(recs))
    argv = ["train", "--student", str(tiny_student_dir), "--data", str(data), "--out", str(tmp_path / policy),
            "--steps", "1", "--batch-size", "2", "--n-eval", "0", "--dtype", "float32", "--no-progress",
            "--missing-marker", policy]
    code = main(argv)
    printed = capsys.readouterr()
    if policy == "error":
        assert code == 2 and "-->" in printed.err
    else:
        assert code == 0
        assert f"task add: {10 if policy == 'keep' else 9} examples" in printed.out


@pytest.mark.parametrize("fails", [False, True])
def test_train_destroys_the_process_group_it_opened(monkeypatch, fails):
    """A torchrun process's group is destroyed when train() returns or raises (left to the interpreter's
    exit, gloo's threads were torn down unjoined and a finished rank aborted); a caller's group is kept."""
    import torch.distributed as dist

    from modecotd_engine.engine import distill

    def fake_train(cfg):  # what _init_distributed does under torchrun, on a one-process store
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        if fails:
            raise RuntimeError("step failed")
        return "result"

    monkeypatch.setattr(distill, "_train", fake_train)
    monkeypatch.setenv("WORLD_SIZE", "2")
    if fails:
        with pytest.raises(RuntimeError, match="step failed"):
            distill.train(TrainConfig())
    else:
        assert distill.train(TrainConfig()) == "result"
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())  # the caller's own group
    try:
        if not fails:
            distill.train(TrainConfig())
            assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
