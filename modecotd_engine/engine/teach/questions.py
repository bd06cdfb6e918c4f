"""A task's questions for a teacher: reading the questions file, the prompts, and the rationale of a sample."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..answers import TASK_TYPES, infer_task_type, split_output
from .teacher import TeachError

DEFAULT_TEMPLATE = "Q: {question}\nA: Let's think step by step."
# The evaluation prompt of the MoDE-CoTD / Fine-tune-CoT data: "choice" wording for multiple-choice tasks,
# "answer" for everything else, as in the released files.
INPUT_TEMPLATE = "Infer the correct {kind} for the question.\n\nQ: {question}\nA:"

# "Infer the correct answer for the question.\n\nQ: ...\nA:" (optionally followed by the zero-shot trigger),
# and the strategy_qa style "<question>\n\n###\n\n".
_PROMPT_RE = re.compile(
    r"^\s*Infer the correct (?:answer|choice) for the question\.\s*(?:Q:\s*)?(?P<q>.*?)\s*\nA:"
    r"(?:\s*Let's think step by step\.)?\s*$",
    re.S,
)
_HASH_PROMPT_RE = re.compile(r"^(?P<q>.*?\S)\s*\n\n###\n\n$", re.S)
# A continuation that starts a new question ran past its own answer.
NEXT_QUESTION_RE = re.compile(r"\n\s*Q:")
_TRAILING_END_RE = re.compile(r"(?<![A-Za-z])END\s*$")


@dataclass(frozen=True)
class Question:
    """One question of a task.

    Attributes:
        index: 0-based position in the questions file (the key of the progress file).
        question: the bare question text the teacher sees.
        input: the training input (the evaluation prompt), written as the record's ``input``.
        gold: the gold answer.
        where: ``"file:line N"`` or ``"file: record N"`` for messages.
    """

    index: int
    question: str
    input: str
    gold: str
    where: str


@dataclass(frozen=True)
class QuestionSet:
    """A task's questions, its name and its answer type (one of ``answers.TASK_TYPES``)."""

    path: Path
    task: str
    task_type: str
    questions: list[Question]
    sha256: str


def split_prompt(text: str) -> tuple[str, bool]:
    """``(question, is_prompt)``: the bare question inside an evaluation prompt, or the text itself."""
    for pattern in (_PROMPT_RE, _HASH_PROMPT_RE):
        m = pattern.match(text)
        if m is not None and m.group("q").strip():
            return m.group("q").strip(), True
    return text.strip(), False


def training_input(question: str, task_type: str) -> str:
    """The engine's prompt for a bare question (``"Infer the correct answer ...\\nQ: ...\\nA:"``)."""
    kind = "choice" if task_type == "choice" else "answer"
    return INPUT_TEMPLATE.format(kind=kind, question=question.strip())


def _gold_of(value: Any) -> str | None:
    """The gold answer of a record's output/answer field (a bare answer or a full training output)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        return None
    parts = split_output(value)
    gold = parts[1] if parts is not None else _TRAILING_END_RE.sub("", value.strip())
    return gold.strip() or None


def load_questions(path: str | Path, *, task: str | None = None, task_type: str | None = None) -> QuestionSet:
    """Read a task's questions: a JSON list or JSONL of ``{"input", "output"}`` or ``{"question", "answer"}``.

    ``output`` may be the bare gold answer or a full training output (the answer after ``-->`` is used);
    ``input`` may be a bare question or an evaluation prompt (kept verbatim as the training input).

    Args:
        path: the questions file.
        task: task name; default the file stem.
        task_type: one of ``answers.TASK_TYPES``; default inferred from the name and the gold answers.

    Raises:
        TeachError: unreadable file, bad JSON, a record without a question or a gold answer (the
            message names the file and line), or an undecidable task type.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TeachError(f"cannot read questions file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TeachError(f"{path}: not UTF-8 text ({exc})") from None

    entries: list[tuple[str, Any]] = []  # (where, parsed record)
    # A .jsonl file is always one record a line; otherwise a leading "[" means one JSON list.
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TeachError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise TeachError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        entries = [(f"{path}: record {i + 1}", rec) for i, rec in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TeachError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not entries:
        raise TeachError(f"{path}: no questions")

    parsed: list[tuple[str, str, str | None, str]] = []  # (question, input or None, gold, where)
    for where, rec in entries:
        if not isinstance(rec, dict):
            raise TeachError(f"{where}: expected an object with 'input'/'output' or 'question'/'answer', "
                             f"got {type(rec).__name__}")
        if "input" in rec or "output" in rec:
            qkey, akey = "input", "output"
        elif "question" in rec or "answer" in rec:
            qkey, akey = "question", "answer"
        else:
            raise TeachError(f"{where}: expected keys 'input'/'output' or 'question'/'answer', "
                             f"found {sorted(rec)}")
        q = rec.get(qkey)
        if not isinstance(q, str) or not q.strip():
            raise TeachError(f"{where}: '{qkey}' must be a non-empty string")
        if akey not in rec:
            raise TeachError(f"{where}: missing '{akey}' (the gold answer)")
        gold = _gold_of(rec[akey])
        if gold is None:
            raise TeachError(f"{where}: '{akey}' must be a non-empty answer string or number, got {rec[akey]!r}")
        question, is_prompt = split_prompt(q)
        parsed.append((question, q if is_prompt else None, gold, where))

    name = task or path.name.split(".")[0]
    if task_type is not None:
        if task_type not in TASK_TYPES:
            raise TeachError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
        ttype = task_type
    else:
        try:
            ttype = infer_task_type(name, [g for _, _, g, _ in parsed])
        except ValueError as exc:
            raise TeachError(f"{path}: {exc}") from None

    questions = [
        Question(index=i, question=q, input=inp if inp is not None else training_input(q, ttype), gold=g, where=w)
        for i, (q, inp, g, w) in enumerate(parsed)
    ]
    return QuestionSet(path=path, task=name, task_type=ttype, questions=questions,
                       sha256=hashlib.sha256(raw).hexdigest())


def load_template(path: str | Path) -> str:
    """Read a prompt template (``str.format`` with ``{question}``) and check that it formats.

    Raises:
        TeachError: unreadable file, no ``{question}`` field, or other fields / stray braces.
    """
    path = Path(path)
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TeachError(f"cannot read template {path}: {exc}") from None
    check_template(template, where=str(path))
    return template


def check_template(template: str, where: str = "template") -> None:
    """Raise TeachError unless ``template.format(question=...)`` works and uses the question."""
    if "{question}" not in template:
        raise TeachError(f"{where}: the template must contain the field {{question}}")
    try:
        template.format(question="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise TeachError(f"{where}: the template does not format with only {{question}} ({exc!r}); "
                         "write literal braces as {{ and }}") from None


def clean_rationale(sample: str) -> str:
    """The rationale of a teacher sample: cut where a new question starts, drop a trailing answer marker.

    ``"... so 7.\\n\\n-->\\n\\n7 END"`` -> ``"... so 7."``. The answer sentence inside the reasoning stays.
    """
    text = NEXT_QUESTION_RE.split(sample, maxsplit=1)[0]
    parts = split_output(text)
    if parts is not None:
        text = parts[0]
    return _TRAILING_END_RE.sub("", text.strip()).strip()


def normalize_rationale(text: str) -> str:
    return " ".join(text.split()).lower()

