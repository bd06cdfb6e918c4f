"""Task files, tokenization with prompt masking, and task-grouped length-bucketed batching.

A task file is ``NAME.json`` (a JSON list) or ``NAME.jsonl`` (one JSON object a line) of records
``{"input": ..., "output": ...}``; its stem ``NAME`` is the task and the expert trained on it.
A training output holds the rationale, a line ``-->``, then the answer and ``END``.

Tokenization concatenates the separately tokenized input and output (plus EOS), so the boundary
between prompt and supervised tokens is exact whatever the tokenizer merges across it. Labels
equal the input ids on supervised positions and -100 elsewhere; the loss code does the shift
(position j is predicted from positions < j).

Batches hold ONE task each: while distilling, a batch's gate is one-hot on that task's expert, so
the fused kernel runs a single expert per batch and skips the others. Within a task, examples are
sorted by length in chunks of a few batches to limit padding, and the batch order is shuffled
across tasks. ``BatchPlan.batch(step)`` is a pure function of ``step``: resuming at a step replays
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modecotd_engine.engine.answers import ANSWER_MARKER

# A task names its expert: the one rule for both (checked with fullmatch).
EXPERT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TASK_FILE_SUFFIXES = (".json", ".jsonl")
MISSING_MARKER_POLICIES = ("drop", "keep", "error")
IGNORE_INDEX = -100

# Batches per sorted chunk: large enough that neighbours in length share a batch, small enough that
# the order inside a task still changes every epoch.
SORT_CHUNK_BATCHES = 8


class DataError(ValueError):
    """Bad input data; the message names the file and the line or record index.

    Args:
        message: what is wrong.
        path: the file (or directory) concerned.
        line: 1-based line number, where known.
        index: 0-based record index, where known.
    """

    def __init__(
        self, message: str, *, path: str | Path | None = None, line: int | None = None, index: int | None = None
    ):
        self.path, self.line, self.index = path, line, index
        place = ", ".join(
            ([f"line {line}"] if line is not None else []) + ([f"record {index}"] if index is not None else [])
        )
        where = ": ".join(str(w) for w in (path, place) if w)
        super().__init__(f"{where}: {message}" if where else message)


def check_task_name(name: str, *, path: str | Path | None = None) -> str:
    """Return ``name`` if it is a valid task/expert name, else raise DataError."""
    if not EXPERT_NAME_RE.fullmatch(name):
        raise DataError(
            f"invalid task name {name!r}: use letters, digits, '_', '.', '-' (first a letter or digit), "
            "at most 64 characters",
            path=path,
        )
    return name


@dataclass
class TaskFile:
    """Records of one task file.

    Attributes:
        name: task name (the file stem).
        path: the file, or None for records built in memory.
        records: ``{"input", "output", ...}`` dicts, in file order.
        missing_marker: how many outputs lacked the ``-->`` marker (dropped, kept or refused).
    """

    name: str
    path: Path | None
    records: list[dict]
    missing_marker: int


def _load_records(path: Path) -> list[tuple[object, int | None]]:
    """(record, line) pairs; line is None for a .json list, where records have no line of their own."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", path=path) from None
    if not text.strip():
        raise DataError("empty file", path=path)
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), lineno))
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=lineno) from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=e.lineno) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", path=path)
    return [(rec, None) for rec in data]


def read_task_file(path: str | Path, *, require_marker: bool = True, missing_marker: str = "drop") -> TaskFile:
    """Read one task file.

    Args:
        path: ``NAME.json`` (a list of records) or ``NAME.jsonl``.
        require_marker: training data: outputs must hold the ``-->`` marker. False for evaluation
            files, whose output is the gold answer alone (missing markers are then only counted).
        missing_marker: with ``require_marker``, what to do with an output lacking the marker:
            ``"drop"`` the record, ``"keep"`` it, or raise (``"error"``).

    Raises:
        DataError: unreadable or malformed file, a record that is not an object with string
            ``input`` and ``output``, an empty input, an empty file, an invalid task name, a missing
            marker under ``"error"``, or no record left.
    """
    if missing_marker not in MISSING_MARKER_POLICIES:
        raise ValueError(f"missing_marker must be one of {MISSING_MARKER_POLICIES}, got {missing_marker!r}")
    path = Path(path)
    if path.suffix not in TASK_FILE_SUFFIXES:
        raise DataError("a task file must end in .json (a list of records) or .jsonl", path=path)
    name = check_task_name(path.stem, path=path)
    records, missing = [], 0
    for index, (rec, line) in enumerate(_load_records(path)):
        if not isinstance(rec, dict):
            raise DataError(f"expected an object with 'input' and 'output', got {type(rec).__name__}",
                            path=path, index=index, line=line)
        for key in ("input", "output"):
            if not isinstance(rec.get(key), str):
                got = "nothing" if key not in rec else type(rec[key]).__name__
                raise DataError(f"'{key}' must be a string, got {got}", path=path, index=index, line=line)
        if not rec["input"].strip():
            raise DataError("empty 'input'", path=path, index=index, line=line)
        if ANSWER_MARKER not in rec["output"]:
            missing += 1
            if require_marker and missing_marker == "error":
                raise DataError(f"output has no {ANSWER_MARKER!r} answer marker", path=path, index=index, line=line)
            if require_marker and missing_marker == "drop":
                continue
        records.append(rec)
    if not records:
        hint = " (an evaluation file? read it with require_marker=False)" if missing else ""
        raise DataError(f"no usable record{hint}", path=path)
    return TaskFile(name=name, path=path, records=records, missing_marker=missing)


def task_files_in(path: str | Path) -> list[Path]:
    """Task files directly inside a directory, sorted by name.

    Skipped: hidden files, and sidecars of a data file such as ``NAME.jsonl.summary.json`` (what
    ``teach`` writes beside its output): a stem that itself holds a data suffix is not a task.
    """
    path = Path(path)
    return sorted(
        p for p in path.iterdir()
        if p.is_file() and p.suffix in TASK_FILE_SUFFIXES and not p.name.startswith(".")
        and not any(f"{suffix}." in p.name for suffix in TASK_FILE_SUFFIXES)
    )


def read_task_dir(path: str | Path, **kw) -> dict[str, TaskFile]:
    """Read every task file in a directory: one task (expert) per file, sorted by name.

    Args:
        path: directory of ``NAME.json`` / ``NAME.jsonl`` files.
        **kw: passed to ``read_task_file``.

    Raises:
        DataError: not a directory, no task file in it, two files for one task, or a bad file.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError("not a directory", path=path)
    files = task_files_in(path)
    if not files:
        raise DataError("no task files (*.json or *.jsonl) in this directory", path=path)
    out: dict[str, TaskFile] = {}
    for f in files:
        if f.stem in out:
            raise DataError(f"task {f.stem!r} has two files: {out[f.stem].path.name} and {f.name}", path=path)
        out[f.stem] = read_task_file(f, **kw)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------
# tokenization


@dataclass
class Example:
    """One tokenized record: the loss covers positions ``>= prompt_len`` (the output and EOS)."""

    task: str
    input_ids: list[int]
    prompt_len: int

    def __len__(self) -> int:
        return len(self.input_ids)


PROMPT_FORMATS = ("plain", "chat")


def format_prompt(tokenizer, text: str, prompt_format: str = "plain") -> str:
    """The prompt text the student sees: ``text`` itself ("plain"), or ``text`` as the user turn of the
    tokenizer's chat template with the assistant turn opened ("chat").

    An instruction-tuned student answers in its own turn structure; trained on bare ``Q: ... A:``
    text its experts learn a format the student never saw, and outside that format (another task's
    prompt wording) they lose both the format and the student's instruction following. Keeping the
    template in training, mixing and inference keeps the student in the distribution it was tuned on.
    """
    if prompt_format == "plain":
        return text
    if prompt_format != "chat":
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids as generation sees them: the tokenizer's own special prefix (BOS where it adds one)
    but never a trailing EOS, which a few tokenizers append and which would end the text early."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids and ids[-1] == eos and not text.endswith(str(tokenizer.eos_token)):
        ids.pop()
    return ids


def pad_token_id(tokenizer) -> int:
    """The id written in padded slots (always under an attention mask): the tokenizer's pad token.

    ``load_student`` gives every tokenizer one (its EOS token when the files name none); a tokenizer
    loaded elsewhere without one pads with EOS in the same way.

    Raises:
        ValueError: a tokenizer with neither a pad nor an EOS token.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def tokenize_records(
    records: Sequence[dict],
    tokenizer,
    *,
    task: str,
    max_len: int,
    add_eos: bool = True,
    vocab_size: int | None = None,
    prompt_format: str = "plain",
) -> tuple[list[Example], dict]:
    """Tokenize records as prompt + output (+ EOS) with the loss on the output only.

    A too-long example loses prompt tokens from the left (at least one prompt token is kept); an
    example whose output (+ EOS) alone does not fit beside one prompt token is dropped.

    Args:
        records: ``{"input", "output"}`` dicts.
        tokenizer: a Hugging Face tokenizer.
        task: task name stored in each Example.
        max_len: maximum tokens per example (prompt + output + EOS).
        add_eos: append the tokenizer's EOS id so the student learns to stop.
        vocab_size: the student's vocabulary size; an id outside ``[0, vocab_size)`` raises.
        prompt_format: "plain" or "chat" (see :func:`format_prompt`); generation must use the same.

    Returns:
        ``(examples, stats)``; stats has ``records``, ``examples``, ``truncated``, ``dropped``,
        ``prompt_tokens``, ``supervised_tokens`` and ``max_tokens`` (after truncation).

    Raises:
        DataError: a record without string input/output, an input with no tokens, or an id outside
            the vocabulary.
        ValueError: ``max_len < 2``, or ``add_eos`` with a tokenizer that has no EOS token.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one prompt and one output token), got {max_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("the tokenizer has no EOS token; pass add_eos=False")
    examples: list[Example] = []
    stats = dict(task=task, records=len(records), examples=0, truncated=0, dropped=0,
                 prompt_tokens=0, supervised_tokens=0, max_tokens=0)
    for index, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or not isinstance(rec.get("output"), str):
            raise DataError("expected an object with string 'input' and 'output'", path=f"task {task}", index=index)
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, rec["input"], prompt_format))
        if not prompt:
            raise DataError("input has no tokens", path=f"task {task}", index=index)
        output = list(tokenizer(rec["output"], add_special_tokens=False)["input_ids"])
        if add_eos:
            output.append(eos)
        if not output or len(output) > max_len - 1:
            stats["dropped"] += 1
            continue
        if len(prompt) + len(output) > max_len:
            # Keep the END of the prompt: the question and the "A:" cue sit next to the output.
            prompt = prompt[len(prompt) + len(output) - max_len:]
            stats["truncated"] += 1
        ids = prompt + output
        if vocab_size is not None:
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise DataError(f"token id {bad[0]} is outside the student's vocabulary (size {vocab_size}); "
                                "is this the student's tokenizer?", path=f"task {task}", index=index)
        examples.append(Example(task=task, input_ids=ids, prompt_len=len(prompt)))
        stats["prompt_tokens"] += len(prompt)
        stats["supervised_tokens"] += len(output)
        stats["max_tokens"] = max(stats["max_tokens"], len(ids))
    stats["examples"] = len(examples)
    return examples, stats


# ----------------------------------------------------------------------------------------------
# batching


@dataclass
class Batch:
    """A padded batch (right padding).

    Attributes:
        input_ids: (B, L) token ids, ``pad_id`` past each sequence's end.
        attention_mask: (B, L) 1 on real tokens, 0 on padding.
        labels: (B, L) ``input_ids`` on supervised positions, -100 on prompt and padding; the loss
            predicts token j from positions < j (the shift is the loss code's).
        task_ids: (B,) index of each row's task (= expert) in the task index.
        num_tokens: number of supervised positions (labels != -100).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    num_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            task_ids=self.task_ids.to(device, non_blocking=non_blocking),
            num_tokens=self.num_tokens,
        )


def collate(examples: Sequence[Example], task_index: dict[str, int], pad_id: int) -> Batch:
    """Pad examples on the right into a Batch.

    Args:
        examples: tokenized examples (any tasks).
        task_index: task name -> expert index.
        pad_id: id written past each sequence's end (masked out, never a label).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    missing = sorted({ex.task for ex in examples} - task_index.keys())
    if missing:
        raise ValueError(f"task(s) {missing} not in the task index {sorted(task_index)}")
    B, L = len(examples), max(len(ex) for ex in examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex)
        ids = torch.tensor(ex.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, ex.prompt_len:n] = ids[ex.prompt_len:]
    task_ids = torch.tensor([task_index[ex.task] for ex in examples], dtype=torch.long)
    num_tokens = sum(len(ex) - ex.prompt_len for ex in examples)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, task_ids=task_ids,
                 num_tokens=num_tokens)


class BatchPlan:
    """Deterministic, resumable sequence of single-task, length-bucketed batches.

    Epoch ``e`` is drawn from ``(seed, e)``: each task's examples are shuffled, cut into chunks of
    ``SORT_CHUNK_BATCHES * batch_size``, sorted by length inside each chunk and cut into batches
    (a task's last batch may be short); then the batches of all tasks are shuffled together. Every
    example appears exactly once per epoch and every batch holds one task.

    Args:
        examples_by_task: task name -> its tokenized examples (none empty).
        batch_size: examples per batch.
        seed: plan seed.
        task_index: task name -> expert index (every task of ``examples_by_task`` must be in it).
        pad_id: padding id for ``collate``.
    """

    def __init__(
        self,
        examples_by_task: dict[str, list[Example]],
        *,
        batch_size: int,
        seed: int,
        task_index: dict[str, int],
        pad_id: int,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not examples_by_task:
            raise ValueError("no tasks to batch")
        empty = sorted(t for t, exs in examples_by_task.items() if not exs)
        if empty:
            raise ValueError(f"task(s) {empty} have no examples (all dropped as too long?)")
        missing = sorted(examples_by_task.keys() - task_index.keys())
        if missing:
            raise ValueError(f"task(s) {missing} not in the task index {sorted(task_index)}")
        self.examples_by_task = {t: list(examples_by_task[t]) for t in sorted(examples_by_task)}
        self.batch_size, self.seed, self.task_index, self.pad_id = batch_size, seed, dict(task_index), pad_id
        self._len = sum(-(-len(exs) // batch_size) for exs in self.examples_by_task.values())
        self._cached: tuple[int, list[tuple[str, list[int]]]] | None = None

    def __len__(self) -> int:
        return self._len

    @property
    def num_examples(self) -> int:
        return sum(len(exs) for exs in self.examples_by_task.values())

    def epoch_order(self, epoch: int) -> list[tuple[str, list[int]]]:
        """The batches of one epoch as ``(task, example indices within the task)``."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        # A str seed is hashed with SHA-512 by random.seed: stable across processes and platforms.
        rng = random.Random(f"batchplan/{self.seed}/{epoch}")
        chunk = SORT_CHUNK_BATCHES * self.batch_size
        batches: list[tuple[str, list[int]]] = []
        for task, exs in self.examples_by_task.items():
            order = list(range(len(exs)))
            rng.shuffle(order)
            for c in range(0, len(order), chunk):
                part = sorted(order[c:c + chunk], key=lambda i: (len(exs[i]), i))
                batches.extend((task, part[b:b + self.batch_size]) for b in range(0, len(part), self.batch_size))
        rng.shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    def batch(self, step: int) -> Batch:
        """The ``step``-th batch (0-based) of the endless sequence of epochs."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self._len)
        task, idx = self.epoch_order(epoch)[i]
        exs = self.examples_by_task[task]
        return collate([exs[j] for j in idx], self.task_index, self.pad_id)


def length_summary(lengths: Iterable[int]) -> dict:
    """min / mean / max of a list of lengths (zeros when empty)."""
    vals = list(lengths)
    if not vals:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(vals), "mean": sum(vals) / len(vals), "max": max(vals)}
