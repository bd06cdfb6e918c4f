"""The teach run: pick a teacher, put every pending question to it, keep the right rationales, and
record progress so that an interrupted run resumes where it stopped (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..answers import answers_match, extract_answer, format_output
from ..atomic import atomic_write_text
from .http_teacher import HTTPTeacher
from .local_teacher import LocalTeacher
from .questions import (
    DEFAULT_TEMPLATE,
    NEXT_QUESTION_RE,
    Question,
    QuestionSet,
    check_template,
    clean_rationale,
    load_questions,
    normalize_rationale,
)
from .teacher import SampleConfig, Teacher, TeachError, TeacherError

log = logging.getLogger(__name__)

# Sampling temperature used when K > 1 and none is given (K = 1 defaults to greedy).
DEFAULT_SAMPLE_TEMPERATURE = 0.7
PROGRESS_FORMAT = "modecotd-teach-progress"
PROGRESS_VERSION = 1
# Failures listed one by one in the summary; the count is always exact.
MAX_LISTED_FAILURES = 50


def make_teacher(
    spec: str | Path | None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    completions: bool = False,
    concurrency: int = 8,
    timeout: float = 60.0,
    retries: int = 4,
    batch_size: int = 8,
    dtype: Any = None,
    device: Any = None,
) -> Teacher:
    """An ``HTTPTeacher`` for an http(s) URL, a ``LocalTeacher`` for a directory, or for None / "builtin"
    the built-in student. ``completions`` means plain-text prompts (``/completions``; no chat template)."""
    if spec is not None and str(spec).startswith(("http://", "https://")):
        return HTTPTeacher(str(spec), model=model, api_key=api_key, completions=completions,
                           concurrency=concurrency, timeout=timeout, retries=retries)
    if spec is None or str(spec) == "builtin":
        return LocalTeacher(None, batch_size=batch_size, chat=False if completions else None,
                            dtype=dtype, device=device)
    path = Path(spec)
    if not path.is_dir():
        raise TeachError(f"teacher {str(spec)!r} is neither an http(s) URL nor a model directory")
    return LocalTeacher(path, batch_size=batch_size, chat=False if completions else None, dtype=dtype, device=device)


@dataclass
class TeachSummary:
    """What a teach run produced for one task (counts cover every run of a resumed output).

    ``asked``: questions put to the teacher (finished + failed); ``answered``: questions where some
    sample had an extractable final answer; ``kept``: questions with at least one kept rationale;
    ``records``: rationales written; ``kept_rate`` = kept / asked.
    """

    task: str
    task_type: str
    questions_file: str
    out: str
    teacher: str
    questions: int
    asked: int = 0
    answered: int = 0
    kept: int = 0
    kept_rate: float = 0.0
    records: int = 0
    samples: int = 0
    duplicates: int = 0
    failed: int = 0
    remaining: int = 0
    complete: bool = False
    aborted: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    teacher_stats: dict[str, Any] = field(default_factory=dict)
    samples_per_question: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int | None = 0
    wall_s: float = 0.0

    def line(self) -> str:
        """A one-line report."""
        text = (f"{self.task} ({self.task_type}): asked {self.asked}, answered {self.answered}, kept {self.kept} "
                f"({100 * self.kept_rate:.1f}%), records {self.records}, duplicates {self.duplicates}, "
                f"failed {self.failed}, remaining {self.remaining}; {self.wall_s:.1f} s")
        return text + (f" [stopped: {self.aborted}]" if self.aborted else "")


def progress_path(out: str | Path) -> Path:
    """``<out>.done``: the finished-question list beside an output file."""
    out = Path(out)
    return out.with_name(out.name + ".done")


def summary_path(out: str | Path) -> Path:
    """``<out>.summary.json``."""
    out = Path(out)
    return out.with_name(out.name + ".summary.json")


def _append_durable(f, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _drop_partial_tail(path: Path) -> None:
    """Cut a last line without its newline (the run died while writing it)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last line (%d bytes)", path, size - cut)
        f.truncate(cut)


def _read_output_inputs(out: Path) -> Counter[str]:
    """How many records each training input has in an existing output."""
    _drop_partial_tail(out)
    counts: Counter[str] = Counter()
    with open(out, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                counts[rec["input"]] += 1
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TeachError(
                    f"{out}:{lineno}: not a training record ({exc!r}); cannot resume this output"
                ) from None
    return counts


def _read_progress(path: Path, qset: QuestionSet) -> dict[int, dict[str, Any]]:
    """Finished questions from ``<out>.done`` (index -> counts)."""
    _drop_partial_tail(path)
    done: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    for lineno, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TeachError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if rec.get("format") == PROGRESS_FORMAT:
            if rec.get("questions_sha256") != qset.sha256:
                raise TeachError(
                    f"{path} was written for a different questions file than {qset.path} (its content "
                    "changed); write to a new --out, or delete the output and its sidecars to start over"
                )
            continue
        index = rec.get("index")
        if not isinstance(index, int) or not 0 <= index < len(qset.questions):
            raise TeachError(f"{path}:{lineno}: question index {index!r} is not in {qset.path} "
                             f"({len(qset.questions)} questions)")
        done[index] = rec
    return done


def teach(
    questions: str | Path,
    out: str | Path,
    teacher: Teacher,
    *,
    samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = 256,
    template: str | None = None,
    resume: bool = False,
    task: str | None = None,
    task_type: str | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> TeachSummary:
    """Have ``teacher`` write rationales for a task's questions; write the right ones as training records.

    Args:
        questions: the questions file (see ``load_questions``).
        out: the output JSONL of ``{"input", "output"}`` training records (appended per question).
        teacher: an ``HTTPTeacher``, a ``LocalTeacher`` or anything following the ``Teacher`` protocol.
        samples: K, completions asked per question.
        temperature: sampling temperature; None = 0 (greedy) for K = 1, else 0.7.
        max_new_tokens: the longest rationale, in tokens.
        template: prompt template with ``{question}``; default zero-shot chain of thought.
        resume: continue an existing output, skipping finished questions; without it an existing
            output is an error.
        task, task_type: override the task name (file stem) and its inferred answer type.
        seed: sampling seed (None: unseeded).
        progress: show a progress bar on stderr.

    Returns:
        The run's ``TeachSummary``, also written to ``<out>.summary.json``. Questions whose teacher
        requests failed are listed there (``failed``) and are retried by a later ``resume`` run.

    Raises:
        TeachError: bad input, an existing output without ``resume``; ``TeacherError`` when the teacher
            refuses the run or becomes unreachable (``.summary`` holds the partial summary, written too).
    """
    if samples < 1:
        raise TeachError(f"samples must be >= 1, got {samples}")
    if max_new_tokens < 1:
        raise TeachError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature is None:
        temperature = 0.0 if samples == 1 else DEFAULT_SAMPLE_TEMPERATURE
    if temperature < 0:
        raise TeachError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and samples > 1:
        log.warning("temperature 0 is greedy: the %d samples per question will collapse to one", samples)
    template = DEFAULT_TEMPLATE if template is None else template
    check_template(template)

    qset = load_questions(questions, task=task, task_type=task_type)
    out = Path(out)
    done_file, summary_file = progress_path(out), summary_path(out)
    t0 = time.perf_counter()

    done: dict[int, dict[str, Any]] = {}
    if out.exists() and not resume:
        raise TeachError(f"{out} already exists; pass --resume to continue it, or choose another --out")
    fresh = not out.exists()
    if not fresh:
        if done_file.exists():
            done = _read_progress(done_file, qset)
        # Records written just before a crash that missed the progress file still count as done.
        have = _read_output_inputs(out)
        recovered = [q for q in qset.questions if q.index not in done and have.get(q.input)]
        for q in recovered:
            done[q.index] = {"index": q.index, "samples": have[q.input], "unique": have[q.input],
                             "answered": True, "kept": have[q.input], "recovered": True}
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
        recovered = []
    if fresh or not done_file.exists():
        # A progress file without its output is stale: start it over with the header.
        header = {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "questions": str(qset.path),
                  "questions_sha256": qset.sha256, "task": qset.task, "task_type": qset.task_type}
        with open(done_file, "w", encoding="utf-8") as f:
            _append_durable(f, json.dumps(header) + "\n")

    config = SampleConfig(samples=samples, temperature=float(temperature), max_new_tokens=max_new_tokens, seed=seed)
    summary = TeachSummary(
        task=qset.task, task_type=qset.task_type, questions_file=str(qset.path), out=str(out),
        teacher=teacher.description, questions=len(qset.questions), samples_per_question=samples,
        temperature=float(temperature), max_new_tokens=max_new_tokens, seed=seed,
    )
    by_index = {q.index: q for q in qset.questions}
    pending = [q for q in qset.questions if q.index not in done]
    jobs = [(q.index, template.format(question=q.question)) for q in pending]
    failures: dict[int, str] = {}
    kept_questions = sum(1 for s in done.values() if s.get("kept"))
    if done:
        log.info("resuming %s: %d of %d questions already done", out, len(done), len(qset.questions))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(qset.questions), initial=len(done), desc=f"teach {qset.task}", unit="q",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    error: BaseException | None = None
    try:
        with open(out, "a", encoding="utf-8") as fout, open(done_file, "a", encoding="utf-8") as fdone:
            for q in recovered:
                _append_durable(fdone, json.dumps(done[q.index]) + "\n")
            if jobs:
                stream = teacher.complete(jobs, config)
                with contextlib.closing(stream):
                    for comp in stream:
                        q = by_index[comp.index]
                        if comp.texts is None:
                            failures[q.index] = comp.error or "no completion"
                            log.warning("question %d (%s) failed: %s", q.index, q.where, comp.error)
                        else:
                            records, stats = _filter(q, comp.texts, qset.task_type)
                            if records:
                                _append_durable(fout, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in records))
                            _append_durable(fdone, json.dumps(stats) + "\n")
                            done[q.index] = stats
                            kept_questions += bool(stats["kept"])
                        bar.update(1)
                        bar.set_postfix(kept=kept_questions, failed=len(failures), refresh=False)
    except BaseException as exc:  # noqa: BLE001 - the summary is written for any ending, then re-raised
        error = exc
    finally:
        bar.close()

    summary.asked = len(done) + len(failures)
    summary.answered = sum(1 for s in done.values() if s.get("answered"))
    summary.kept = sum(1 for s in done.values() if s.get("kept"))
    summary.records = sum(int(s.get("kept", 0)) for s in done.values())
    summary.samples = sum(int(s.get("samples", 0)) for s in done.values())
    summary.duplicates = sum(int(s.get("samples", 0)) - int(s.get("unique", 0)) for s in done.values())
    summary.kept_rate = summary.kept / summary.asked if summary.asked else 0.0
    summary.failed = len(failures)
    summary.failures = [{"index": i, "where": by_index[i].where, "error": e}
                        for i, e in sorted(failures.items())[:MAX_LISTED_FAILURES]]
    summary.remaining = len(qset.questions) - len(done)
    summary.complete = summary.remaining == 0
    summary.teacher_stats = teacher.stats()
    summary.wall_s = time.perf_counter() - t0
    if error is not None:
        summary.aborted = "interrupted" if isinstance(error, KeyboardInterrupt) else (
            str(error) if isinstance(error, TeachError) else f"{type(error).__name__}: {error}")
    atomic_write_text(summary_file, json.dumps(asdict(summary), indent=2, ensure_ascii=False) + "\n")
    log.info("teach %s", summary.line())
    if isinstance(error, TeacherError):
        error.summary = summary
        raise error
    if error is not None:
        raise error
    return summary


def _filter(q: Question, texts: Sequence[str], task_type: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Training records of the right, distinct samples of one question, and its progress line."""
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    answered = False
    unique = 0
    for text in texts:
        # Lone surrogates (from a server's JSON escapes) cannot be written as UTF-8.
        text = text.encode("utf-8", "replace").decode("utf-8")
        # The answer is read from the sample as cut where it starts a new question, so numbers of an
        # invented follow-up do not count.
        sample = NEXT_QUESTION_RE.split(text, maxsplit=1)[0]
        rationale = clean_rationale(sample)
        key = normalize_rationale(rationale)
        if key in seen:
            continue
        seen.add(key)
        unique += 1
        pred = extract_answer(sample, task_type)
        answered |= pred is not None
        if rationale and answers_match(pred, q.gold, task_type):
            records.append({"input": q.input, "output": format_output(rationale, q.gold)})
    stats = {"index": q.index, "samples": len(texts), "unique": unique, "answered": answered, "kept": len(records)}
    return records, stats
