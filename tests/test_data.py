"""Task files, tokenization with prompt masking, collation and the batch plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modecotd_engine.engine.data import (
    EXPERT_NAME_RE,
    BatchPlan,
    DataError,
    Example,
    collate,
    read_task_dir,
    read_task_file,
    task_files_in,
    tokenize_records,
)

GOOD = [
    {"input": "Q: 1 + 2?\nA:", "output": "1 + 2 = 3.\n\n-->\n\n3 END"},
    {"input": "Q: 2 + 2?\nA:", "output": "2 + 2 = 4.\n\n-->\n\n4 END", "id": 7},
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, records) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- reading task files


def test_read_json_list_and_jsonl(tmp_path):
    a = read_task_file(_write(tmp_path / "sum.json", json.dumps(GOOD, indent=1)))
    b = read_task_file(_jsonl(tmp_path / "sum2.jsonl", GOOD))
    assert a.name == "sum" and b.name == "sum2"
    assert a.records == b.records == GOOD  # extra keys are kept
    assert a.missing_marker == 0 and a.path == tmp_path / "sum.json"


def test_jsonl_blank_lines_are_skipped(tmp_path):
    text = "\n" + json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n"
    tf = read_task_file(_write(tmp_path / "t.jsonl", text))
    assert tf.records == GOOD


@pytest.mark.parametrize("policy, kept, raises", [("drop", 2, False), ("keep", 3, False), ("error", None, True)])
def test_missing_marker_policies(tmp_path, policy, kept, raises):
    path = _jsonl(tmp_path / "t.jsonl", GOOD[:1] + [{"input": "Q: x\nA:", "output": "no marker"}] + GOOD[1:])
    if raises:
        with pytest.raises(DataError) as e:
            read_task_file(path, missing_marker=policy)
        assert "t.jsonl" in str(e.value) and "record 1" in str(e.value) and "line 2" in str(e.value)
        return
    tf = read_task_file(path, missing_marker=policy)
    assert len(tf.records) == kept and tf.missing_marker == 1


def test_eval_files_need_no_marker(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"input": "Q: x\nA:", "output": "5"}])
    tf = read_task_file(path, require_marker=False)
    assert tf.records == [{"input": "Q: x\nA:", "output": "5"}] and tf.missing_marker == 1
    # Read as training data, every record is dropped; the error says what may be going on.
    with pytest.raises(DataError, match="require_marker=False"):
        read_task_file(path)


def test_bad_policy_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="missing_marker"):
        read_task_file(_jsonl(tmp_path / "t.jsonl", GOOD), missing_marker="skip")


@pytest.mark.parametrize(
    "filename, text, needle",
    [
        ("t.jsonl", json.dumps(GOOD[0]) + "\n{\"input\": \"x\", \n", "line 2"),
        ("t.json", '[\n{"input": "a", "output": "b"},\n{"input": }\n]', "line 3"),
        ("t.json", '{"input": "a", "output": "b"}', "expected a JSON list"),
        ("t.jsonl", json.dumps(GOOD[0]) + "\n[1, 2]\n", "record 1"),
        ("t.json", json.dumps([GOOD[0], "text"]), "record 1"),
        ("t.jsonl", json.dumps({"output": "-->"}) + "\n", "'input' must be a string, got nothing"),
        ("t.jsonl", json.dumps({"input": "q", "output": 5}) + "\n", "'output' must be a string, got int"),
        ("t.jsonl", json.dumps({"input": "  ", "output": "-->"}) + "\n", "empty 'input'"),
        ("t.jsonl", "", "empty file"),
        ("t.json", "  \n", "empty file"),
        ("t.txt", json.dumps(GOOD), ".json"),
        ("-bad.jsonl", json.dumps(GOOD[0]), "invalid task name"),
        ("has space.jsonl", json.dumps(GOOD[0]), "invalid task name"),
        ("x" * 65 + ".jsonl", json.dumps(GOOD[0]), "invalid task name"),
    ],
)
def test_read_errors_name_the_file_and_place(tmp_path, filename, text, needle):
    path = _write(tmp_path / filename, text)
    with pytest.raises(DataError) as e:
        read_task_file(path)
    msg = str(e.value)
    assert needle in msg and filename in msg, msg


def test_non_utf8_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"input": "\xff\xfe", "output": "-->"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        read_task_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_task_file(tmp_path / "absent.jsonl")


def test_expert_name_re():
    for ok in ("gsm8k", "a", "A.b-c_d", "9lives", "x" * 64):
        assert EXPERT_NAME_RE.fullmatch(ok), ok
    for bad in ("", "_a", ".hidden", "a/b", "a b", "x" * 65, "é"):
        assert not EXPERT_NAME_RE.fullmatch(bad), bad


def test_read_task_dir(tmp_path):
    _jsonl(tmp_path / "zeta.jsonl", GOOD)
    _write(tmp_path / "alpha.json", json.dumps(GOOD))
    _write(tmp_path / ".alpha.jsonl.tmp123", "garbage")  # temporary/hidden files are not tasks
    _write(tmp_path / "notes.txt", "not a task")
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "inner.jsonl", GOOD)  # not recursive
    tasks = read_task_dir(tmp_path)
    assert list(tasks) == ["alpha", "zeta"]
    assert tasks["alpha"].records == GOOD


def test_read_task_dir_errors(tmp_path):
    with pytest.raises(DataError, match="no task files"):
        read_task_dir(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        read_task_dir(tmp_path / "absent")
    _jsonl(tmp_path / "dup.jsonl", GOOD)
    _write(tmp_path / "dup.json", json.dumps(GOOD))
    with pytest.raises(DataError, match="two files"):
        read_task_dir(tmp_path)


def test_read_task_dir_passes_options(tmp_path):
    _jsonl(tmp_path / "t.jsonl", [{"input": "q", "output": "5"}])
    with pytest.raises(DataError, match="t.jsonl: line 1, record 0: output has no"):
        read_task_dir(tmp_path, missing_marker="error")
    assert read_task_dir(tmp_path, require_marker=False)["t"].records[0]["output"] == "5"


# ---------------------------------------------------------------- tokenization


RECORDS = [
    {
        "input": "Infer the correct answer.\n\nQ: Bob has 3 cups, gets 2 more.\nA:",
        "output": "3 + 2 = 5.\n\n-->\n\n5 END",
    },
    {"input": "Q: short\nA:", "output": "a much longer output that says something\n\n-->\n\nyes END"},
]


def test_tokenize_masks_the_prompt_exactly(tiny_tokenizer):
    tok = tiny_tokenizer
    examples, stats = tokenize_records(RECORDS, tok, task="t", max_len=512)
    assert stats["examples"] == 2 and stats["truncated"] == 0 and stats["dropped"] == 0
    for ex, rec in zip(examples, RECORDS):
        assert ex.task == "t"
        assert tok.decode(ex.input_ids[: ex.prompt_len]) == rec["input"]
        assert ex.input_ids[-1] == tok.eos_token_id
        assert tok.decode(ex.input_ids[ex.prompt_len : -1]) == rec["output"]
        # Input and output are tokenized separately and concatenated.
        separate = tok(rec["input"])["input_ids"] + tok(rec["output"], add_special_tokens=False)["input_ids"]
        assert ex.input_ids == separate + [tok.eos_token_id]
    assert stats["supervised_tokens"] == sum(len(ex) - ex.prompt_len for ex in examples)
    assert stats["prompt_tokens"] == sum(ex.prompt_len for ex in examples)
    assert stats["max_tokens"] == max(len(ex) for ex in examples)

    batch = collate(examples, {"t": 0}, pad_id=tok.pad_token_id)
    for i, ex in enumerate(examples):
        sup = batch.labels[i] != -100
        assert sup.nonzero().flatten().tolist() == list(range(ex.prompt_len, len(ex)))
        assert tok.decode(batch.labels[i, sup][:-1].tolist()) == RECORDS[i]["output"]
    assert batch.num_tokens == stats["supervised_tokens"]


def test_tokenize_without_eos(tiny_tokenizer):
    (ex,), _ = tokenize_records(RECORDS[:1], tiny_tokenizer, task="t", max_len=512, add_eos=False)
    assert tiny_tokenizer.decode(ex.input_ids[ex.prompt_len :]) == RECORDS[0]["output"]


def test_truncation_keeps_the_prompt_tail_and_drops_too_long_outputs(tiny_tokenizer):
    tok = tiny_tokenizer
    full, _ = tokenize_records(RECORDS, tok, task="t", max_len=512)
    out_lens = [len(ex) - ex.prompt_len for ex in full]  # output + EOS
    # max_len where record 0 must lose prompt tokens and record 1 keeps exactly one prompt token.
    max_len = out_lens[1] + 1
    assert out_lens[0] + full[0].prompt_len > max_len > out_lens[0]
    examples, stats = tokenize_records(RECORDS, tok, task="t", max_len=max_len)
    assert stats == dict(stats, examples=2, truncated=2, dropped=0)
    for ex, ref in zip(examples, full):
        assert len(ex) == max_len
        kept = ex.prompt_len
        assert kept >= 1
        assert ex.input_ids[:kept] == ref.input_ids[ref.prompt_len - kept : ref.prompt_len]  # the prompt's tail
        assert ex.input_ids[kept:] == ref.input_ids[ref.prompt_len :]  # the output untouched
    assert examples[1].prompt_len == 1

    # One token less and record 1's output no longer fits beside a prompt token: dropped.
    examples, stats = tokenize_records(RECORDS, tok, task="t", max_len=max_len - 1)
    assert stats["dropped"] == 1 and stats["truncated"] == 1 and stats["examples"] == 1
    assert tok.decode(examples[0].input_ids[examples[0].prompt_len : -1]) == RECORDS[0]["output"]


def test_tokenize_errors(tiny_tokenizer):
    with pytest.raises(DataError, match="outside the student's vocabulary"):
        tokenize_records(RECORDS, tiny_tokenizer, task="t", max_len=512, vocab_size=10)
    # Exactly the tokenizer's vocabulary passes.
    tokenize_records(RECORDS, tiny_tokenizer, task="t", max_len=512, vocab_size=len(tiny_tokenizer))
    with pytest.raises(DataError, match="task t: record 1"):
        tokenize_records([RECORDS[0], {"input": "q"}], tiny_tokenizer, task="t", max_len=512)
    with pytest.raises(ValueError, match="max_len"):
        tokenize_records(RECORDS, tiny_tokenizer, task="t", max_len=1)


class _NoEosTokenizer:
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 50 for c in text]}


def test_tokenizer_without_eos():
    with pytest.raises(ValueError, match="no EOS"):
        tokenize_records(RECORDS, _NoEosTokenizer(), task="t", max_len=512)
    examples, _ = tokenize_records(RECORDS, _NoEosTokenizer(), task="t", max_len=512, add_eos=False)
    assert examples[0].prompt_len == len(RECORDS[0]["input"])


def test_input_with_no_tokens():
    with pytest.raises(DataError, match="no tokens"):
        tokenize_records([{"input": "", "output": "x"}], _NoEosTokenizer(), task="t", max_len=512, add_eos=False)


# ---------------------------------------------------------------- collate


def test_collate_pads_right():
    exs = [Example("a", [5, 6, 7, 8], 2), Example("b", [9, 10], 1), Example("a", [11, 12, 13], 3)]
    b = collate(exs, {"a": 0, "b": 1}, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert b.labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100], [-100, -100, -100, -100]]
    assert b.task_ids.tolist() == [0, 1, 0]
    assert b.num_tokens == 3
    assert all(t.dtype == torch.long for t in (b.input_ids, b.attention_mask, b.labels, b.task_ids))
    moved = b.to("cpu")
    assert torch.equal(moved.labels, b.labels) and moved.num_tokens == 3


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        collate([], {"a": 0}, pad_id=0)
    with pytest.raises(ValueError, match="not in the task index"):
        collate([Example("zz", [1, 2], 1)], {"a": 0}, pad_id=0)


# ---------------------------------------------------------------- batch plan


def _examples(seed: int = 0) -> dict[str, list[Example]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t, n in (("a", 37), ("b", 20), ("c", 5)):
        lens = torch.randint(3, 60, (n,), generator=g).tolist()
        # The first token encodes (task, index) so a batch row can be traced to its example.
        code = {"a": 1000, "b": 2000, "c": 3000}[t]
        out[t] = [Example(t, [code + i] + [7] * (L - 1), 1) for i, L in enumerate(lens)]
    return out


def _plan(seed=0, batch_size=4):
    return BatchPlan(_examples(), batch_size=batch_size, seed=seed, task_index={"a": 0, "b": 1, "c": 2}, pad_id=0)


def test_plan_covers_every_example_once_per_epoch_one_task_per_batch():
    plan = _plan()
    assert len(plan) == 10 + 5 + 2 and plan.num_examples == 62
    index = {"a": 0, "b": 1, "c": 2}
    for epoch in range(3):
        seen = []
        for step in range(epoch * len(plan), (epoch + 1) * len(plan)):
            b = plan.batch(step)
            assert b.input_ids.shape[0] <= 4
            assert len(set(b.task_ids.tolist())) == 1  # one task per batch
            task = next(t for t, i in index.items() if i == b.task_ids[0].item())
            codes = b.input_ids[:, 0].tolist()
            assert all(c // 1000 == index[task] + 1 for c in codes)
            seen += codes
        everything = [1000 + i for i in range(37)] + [2000 + i for i in range(20)] + [3000 + i for i in range(5)]
        assert sorted(seen) == everything


def test_plan_is_deterministic_and_resumable():
    a, b = _plan(seed=5), _plan(seed=5)
    steps = list(range(0, 3 * len(a)))
    ref = [a.batch(s).input_ids for s in steps]
    # A fresh plan asked for steps out of order (a resumed run) gives the same batches.
    for s in reversed(steps):
        assert torch.equal(b.batch(s).input_ids, ref[s])
    other = _plan(seed=6)
    assert any(not torch.equal(other.batch(s).input_ids, ref[s]) for s in steps)


def test_plan_reshuffles_each_epoch():
    plan = _plan()
    assert plan.epoch_order(0) != plan.epoch_order(1)
    first = [plan.batch(s).input_ids[:, 0].tolist() for s in range(len(plan))]
    second = [plan.batch(s + len(plan)).input_ids[:, 0].tolist() for s in range(len(plan))]
    assert first != second


def test_plan_buckets_by_length():
    plan = _plan(batch_size=4)
    exs = plan.examples_by_task

    def padding(batches):
        return sum(max(len(exs[t][i]) for i in idx) * len(idx) - sum(len(exs[t][i]) for i in idx) for t, idx in batches)

    sorted_pad = padding(plan.epoch_order(0))
    # The same tasks batched in a random order without sorting pad far more.
    g = torch.Generator().manual_seed(0)
    unsorted = []
    for t, lst in exs.items():
        perm = torch.randperm(len(lst), generator=g).tolist()
        unsorted += [(t, perm[k : k + 4]) for k in range(0, len(perm), 4)]
    assert sorted_pad < 0.5 * padding(unsorted)
    # Inside a task, batches are cut from length-sorted chunks.
    for t, idx in plan.epoch_order(0):
        lens = [len(exs[t][i]) for i in idx]
        assert lens == sorted(lens)


def test_plan_errors():
    exs = _examples()
    index = {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="batch_size"):
        BatchPlan(exs, batch_size=0, seed=0, task_index=index, pad_id=0)
    with pytest.raises(ValueError, match="no tasks"):
        BatchPlan({}, batch_size=2, seed=0, task_index=index, pad_id=0)
    with pytest.raises(ValueError, match=r"\['b'\] have no examples"):
        BatchPlan(dict(exs, b=[]), batch_size=2, seed=0, task_index=index, pad_id=0)
    with pytest.raises(ValueError, match="not in the task index"):
        BatchPlan(exs, batch_size=2, seed=0, task_index={"a": 0}, pad_id=0)
    with pytest.raises(ValueError, match="step"):
        _plan().batch(-1)


# ---------------------------------------------------------------- CLI


def _cli():
    import argparse

    from modecotd_engine.cli import data as data_cli

    parser = argparse.ArgumentParser(prog="modecotd-engine")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_builtin_then_check(tmp_path, capsys):
    parser = _cli()
    args = parser.parse_args(["data", "builtin", "--out", str(tmp_path / "b"), "--n-train", "12", "--n-eval", "4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "train/word_math.jsonl (12)" in out and "eval/price_math.jsonl (4)" in out
    assert len(read_task_dir(tmp_path / "b" / "train")["word_math"].records) == 12

    args = parser.parse_args(["data", "check", str(tmp_path / "b")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    # eval/ files hold gold answers only: every record counted as lacking the marker.
    eval_row = next(line for line in out.splitlines() if line.split()[:1] == ["price_math"] and " 4 " in line)
    assert eval_row.split()[1:3] == ["4", "4"]
    assert "21 task file(s)" in out

    args = parser.parse_args(["data", "check", str(tmp_path / "b" / "train" / "coin_flips.jsonl")])
    assert args.func(args) == 0
    assert "coin_flips" in capsys.readouterr().out


def test_cli_check_reports_bad_data(tmp_path, capsys):
    parser = _cli()
    bad = _write(tmp_path / "t.jsonl", json.dumps(GOOD[0]) + "\n{oops\n")
    args = parser.parse_args(["data", "check", str(bad)])
    assert args.func(args) == 1
    assert "t.jsonl: line 2" in capsys.readouterr().err
    _jsonl(tmp_path / "t.jsonl", [{"input": "q", "output": "5"}])
    args = parser.parse_args(["data", "check", str(tmp_path), "--missing-marker", "error"])
    assert args.func(args) == 1
    assert "answer marker" in capsys.readouterr().err
    args = parser.parse_args(["data", "builtin", "--out", str(tmp_path / "o"), "--n-eval", "0"])
    assert args.func(args) == 1
    assert "--n-eval must be >= 1" in capsys.readouterr().err


def test_task_dir_skips_sidecars_of_data_files(tmp_path):
    """``teach`` writes NAME.jsonl.summary.json beside its output: not a task of its own."""
    import json as _json

    (tmp_path / "word_math.jsonl").write_text(_json.dumps({"input": "Q: 1+1\nA:", "output": "1 + 1 = 2.\n\n-->\n\n2 END"}) + "\n")
    (tmp_path / "word_math.jsonl.summary.json").write_text(_json.dumps({"asked": 1}))
    assert [p.name for p in task_files_in(tmp_path)] == ["word_math.jsonl"]
    assert list(read_task_dir(tmp_path)) == ["word_math"]
