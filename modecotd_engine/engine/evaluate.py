"""Evaluation: generate for every record, extract the answer, score it against the gold answer.

A record is ``{"input", "output"}`` where ``output`` is either the gold answer alone (evaluation
files) or a full training output (rationale, ``-->``, answer, ``END``), whose gold is the text after
the last ``-->`` up to ``END``.

Several tasks, each with its own gate (its own expert, a mixture, or none), are served together in
shared mixed batches (:func:`evaluate_many`): one generation call over every record of every task.

Scoring is exact on normalized answers (``answers.answers_match``). ``compat_substring=True``
reproduces the original MoDE-CoTD evaluator instead: a prediction counts as correct when the gold
string occurs anywhere in the generated answer text (so "26" is scored correct for gold "2"). It
is kept only to compare with published numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .answer_guide import AnswerForm
from .answers import (ANSWER_MARKER, END_TOKEN, TASK_TYPES, answers_match, extract_answer, infer_task_type,
                      normalize_answer, split_output)
from .generate import GenerationConfig, GenerationError, generate_detailed
from .inject import MixtureHandle


@dataclass
class TaskResult:
    """Scores of one task.

    Attributes:
        task: task name.
        task_type: answer type used for extraction and scoring.
        n: records evaluated.
        correct: records scored correct.
        unextracted: generations from which no answer could be extracted (scored wrong).
        predictions: per record ``{"index", "input", "gold", "prediction", "generation", "correct",
            "num_tokens", "finish_reason"}``.
    """

    task: str
    task_type: str
    n: int
    correct: int
    unextracted: int
    predictions: list[dict] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        """Fraction correct (0.0 for an empty task)."""
        return self.correct / self.n if self.n else 0.0

    @property
    def forced(self) -> int:
        """Records whose (first) generation had its answer marker written for it (guided answers)."""
        return sum(p.get("finish_reason") == "forced" for p in self.predictions)

    @property
    def majority(self) -> float | None:
        """Accuracy of one constant answer, the most common gold answer (None without predictions).

        The floor a system must clear before its accuracy says anything about reasoning: on a yes/no
        task whose records are 60% "no", a student that always answers "no" scores 60%.
        """
        if not self.predictions:
            return None
        golds = Counter(normalize_answer(p["gold"], self.task_type) for p in self.predictions)
        return golds.most_common(1)[0][1] / len(self.predictions)

    @property
    def top_answer(self) -> tuple[str, float] | None:
        """The most frequent extracted answer and the share of records that gave it (1.0: the system
        answered every record the same); None without predictions or without any extracted answer."""
        preds = Counter(normalize_answer(p["prediction"], self.task_type) for p in self.predictions
                        if p.get("prediction") is not None)
        if not preds:
            return None
        answer, count = preds.most_common(1)[0]
        return answer, count / len(self.predictions)

    def summary(self) -> dict:
        """The scores without the predictions (for summary files)."""
        top = self.top_answer
        return {"task": self.task, "task_type": self.task_type, "n": self.n, "correct": self.correct,
                "accuracy": self.accuracy, "unextracted": self.unextracted, "forced": self.forced,
                "majority": self.majority, "top_answer": None if top is None else top[0],
                "top_answer_share": None if top is None else top[1]}


def _spread_cells(r: TaskResult) -> str:
    top = r.top_answer
    majority = "-" if r.majority is None else f"{r.majority:.1%}"
    answer = "-" if top is None else f"{top[0].replace('|', '/')[:24]} ({top[1]:.0%})"
    return f" {majority} | {answer} |"


def gold_answer(output: str) -> str:
    """The gold answer of a record's ``output``: after the last ``-->`` up to ``END``, or the output
    itself (a trailing ``END`` removed)."""
    split = split_output(output)
    if split is not None:
        return split[1]
    text = output.strip()
    if text.endswith(END_TOKEN):
        text = text[: -len(END_TOKEN)].rstrip()
    return text


def _answer_text(generation: str) -> str:
    """What the original evaluator compared: the text after the last marker (else all of it)."""
    return generation.rsplit(ANSWER_MARKER, 1)[1] if ANSWER_MARKER in generation else generation


def _check_records(task: str, records: Sequence[dict]) -> None:
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise GenerationError(f"task {task}: records must be a list of {{'input', 'output'}} dicts")
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise GenerationError(f"task {task}: record {i} is a {type(rec).__name__}, not an object")
        for key in ("input", "output"):
            if not isinstance(rec.get(key), str):
                raise GenerationError(f"task {task}: record {i} has no string {key!r}")
        if not rec["input"].strip():
            raise GenerationError(f"task {task}: record {i} has an empty 'input'")


def majority_vote(answers: Sequence[str | None], task_type: str) -> tuple[str | None, dict[str, int]]:
    """The most frequent extracted answer (self-consistency, Wang et al. 2023) and the vote counts.

    Answers are grouped by their normalized form; ``None`` (no answer) never wins while any sample
    has one; a tie goes to the answer that appeared first.
    """
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in answers:
        if a is None:
            continue
        key = normalize_answer(a, task_type)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, a)
    if not counts:
        return None, {}
    best = max(counts, key=lambda k: counts[k])  # max keeps the first of equal counts (insertion order)
    return first[best], counts


def score_generations(task: str, task_type: str, records: Sequence[dict], golds: list[str], texts: list[str],
                      num_tokens: list[int], reasons: list[str], compat_substring: bool = False,
                      samples: int = 1) -> TaskResult:
    """Score generated texts (nothing is generated here): extract each record's answer (the record's
    ``input`` gives a choice question's options) and compare it with its gold. With ``samples`` > 1,
    ``texts`` holds that many generations per record (record-major) and the majority answer is scored."""
    correct = unextracted = 0
    predictions = []
    for i, (rec, gold) in enumerate(zip(records, golds)):
        span = slice(i * samples, (i + 1) * samples)
        group = texts[span]
        answers = [extract_answer(t, task_type, question=rec["input"]) for t in group]
        pred, votes = (answers[0], None) if samples == 1 else majority_vote(answers, task_type)
        text = group[0] if pred is None else group[answers.index(pred)]  # a generation that gave the answer
        if pred is None:
            unextracted += 1
        ok = answers_match(_answer_text(text) if compat_substring else pred, gold, task_type,
                           compat_substring=compat_substring)
        correct += ok
        record = {"index": i, "input": rec["input"], "gold": gold, "prediction": pred, "generation": text,
                  "correct": bool(ok), "num_tokens": sum(num_tokens[span]), "finish_reason": reasons[span][0]}
        if samples > 1:
            record.update(votes=votes, sample_answers=answers, finish_reasons=reasons[span])
        predictions.append(record)
    return TaskResult(task, task_type, len(records), correct, unextracted, predictions)


def _resolve_type(task: str, golds: list[str], task_type: str | None) -> str:
    if task_type is not None:
        if task_type not in TASK_TYPES:
            raise GenerationError(
                f"task {task}: unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}"
            )
        return task_type
    return infer_task_type(task, golds)


def evaluate_records(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    *,
    task: str,
    task_type: str | None = None,
    handle: MixtureHandle | None = None,
    gate: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    compat_substring: bool = False,
    progress: bool = False,
) -> TaskResult:
    """Generate, extract and score one task's records.

    Args:
        model: the student (with experts injected when ``handle`` is given).
        tokenizer: its tokenizer.
        records: ``{"input", "output"}`` dicts; ``output`` is the gold answer or a training output.
        task: task name (also decides the task type when ``task_type`` is None).
        task_type: one of ``answers.TASK_TYPES``; None infers it from the name, else the golds.
        handle: the injection handle (needed with ``gate``).
        gate: (E,) gate for every record, or None for the frozen student.
        config: decoding settings (greedy, stop at ``END`` by default).
        compat_substring: score as the original evaluator (gold is a substring of the answer text).
        progress: show a progress bar.
    """
    return evaluate_many(model, tokenizer, {task: records}, task_types={task: task_type} if task_type else None,
                         handle=handle, gates={task: gate}, config=config, compat_substring=compat_substring,
                         progress=progress)[task]


def evaluate_many(
    model: nn.Module,
    tokenizer,
    tasks: Mapping[str, Sequence[dict]],
    *,
    task_types: Mapping[str, str | None] | None = None,
    handle: MixtureHandle | None = None,
    gates: Mapping[str, torch.Tensor | None] | None = None,
    config: GenerationConfig | None = None,
    compat_substring: bool = False,
    progress: bool = False,
    samples: int = 1,
    modes: Mapping[str, str] | None = None,
) -> dict[str, TaskResult]:
    """Evaluate several tasks at once, each with its own gate, in shared mixed batches.

    Args:
        model: the student (with experts injected when any gate is given).
        tokenizer: its tokenizer.
        tasks: task name -> records ``{"input", "output"}``.
        task_types: task name -> task type; a task not in it (or None) gets ``infer_task_type``.
        handle: the injection handle.
        gates: task name -> (E,) gate, or None (or absent) for the frozen student on that task.
        config: decoding settings.
        compat_substring: score as the original evaluator (see the module docstring).
        progress: show a progress bar of finished requests.
        samples: generations per record; > 1 scores the majority answer (self-consistency), and
            needs a sampling ``config`` (temperature > 0).
        modes: task name -> composition of its gate ("output" / "weight"); a task not in it gets
            the handle's mode. Tasks of both modes share the batches.

    Returns:
        Task name -> TaskResult, in the order of ``tasks``.
    """
    if samples < 1:
        raise GenerationError(f"samples must be >= 1, got {samples}")
    if samples > 1 and (config is None or config.greedy):
        raise GenerationError("voting over samples needs sampling: set a temperature > 0")
    task_types = dict(task_types or {})
    gates = dict(gates or {})
    unknown = sorted(set(gates) - set(tasks))
    if unknown:
        raise GenerationError(f"gates given for tasks that are not evaluated: {', '.join(unknown)}")
    prompts: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    golds: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for task, records in tasks.items():
        _check_records(task, records)
        golds[task] = [gold_answer(r["output"]) for r in records]
        types[task] = _resolve_type(task, golds[task], task_types.get(task))
        spans[task] = (len(prompts), len(prompts) + len(records) * samples)
        prompts.extend(r["input"] for r in records for _ in range(samples))

    gate_rows = None
    if any(g is not None for g in gates.values()):
        if handle is None:
            raise GenerationError("gates were given without a MixtureHandle: inject the experts first")
        e = handle.bank.num_experts
        gate_rows = torch.zeros(len(prompts), e)
        for task, g in gates.items():
            if g is None:
                continue
            g = torch.as_tensor(g, dtype=torch.float32).detach().cpu()
            if tuple(g.shape) != (e,):
                raise GenerationError(f"task {task}: gate must be (E={e},), got {tuple(g.shape)}")
            lo, hi = spans[task]
            gate_rows[lo:hi] = g
    row_modes = None
    if modes and gate_rows is not None:
        row_modes = [handle.state.mode] * len(prompts)
        for task, m in modes.items():
            if task not in spans:
                raise GenerationError(f"a mode given for task {task}, which is not evaluated")
            lo, hi = spans[task]
            row_modes[lo:hi] = [m] * (hi - lo)
    config = config or GenerationConfig()
    forms = None
    if config.guide_answers:
        forms = [AnswerForm.of(types[task], r["input"]) for task, records in tasks.items()
                 for r in records for _ in range(samples)]
    res = generate_detailed(model, tokenizer, prompts, handle=handle, gates=gate_rows,
                            config=config, progress=progress, modes=row_modes, answers=forms)
    out: dict[str, TaskResult] = {}
    for task, records in tasks.items():
        lo, hi = spans[task]
        out[task] = score_generations(task, types[task], records, golds[task], res.texts[lo:hi],
                                      res.num_tokens[lo:hi], res.finish_reasons[lo:hi], compat_substring, samples)
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def averages(results: Mapping[str, TaskResult], *, seen: set[str] | None = None) -> dict:
    """Macro averages of per-task accuracy: ``{"all", "seen", "unseen"}`` (None where no task)."""
    accs = {t: r.accuracy for t, r in results.items()}
    out = {"all": _mean(list(accs.values()))}
    if seen is not None:
        out["seen"] = _mean([a for t, a in accs.items() if t in seen])
        out["unseen"] = _mean([a for t, a in accs.items() if t not in seen])
    return out


def accuracy_table(results: Mapping[str, TaskResult], *, seen: set[str] | None = None) -> str:
    """Markdown table: per-task accuracy, counts, unextracted answers, then seen/unseen averages.

    Averages are macro averages (the mean of per-task accuracies, as the paper reports them);
    ``seen`` names the tasks that have their own expert (None: no seen/unseen split). With
    predictions, two columns say what the accuracy is worth: ``majority``, the accuracy of always
    giving the most common gold answer, and ``top answer``, the most frequent answer and the share of
    records that got it (a system that answers everything the same scores the class balance).
    """
    has_split = seen is not None
    guided = any(r.forced for r in results.values())  # a column for guided answers written after a forced marker
    spread = any(r.predictions for r in results.values())
    head = ("| task | type |" + (" seen |" if has_split else "") + " n | correct | accuracy | unextracted |"
            + (" forced |" if guided else "") + (" majority | top answer |" if spread else ""))
    rule = ("|---|---|" + ("---|" if has_split else "") + "---:|---:|---:|---:|" + ("---:|" if guided else "")
            + ("---:|---|" if spread else ""))
    rows = [head, rule]
    for task, r in results.items():
        mark = (" yes |" if task in seen else " no |") if has_split else ""
        rows.append(f"| {task} | {r.task_type} |{mark} {r.n} | {r.correct} | {r.accuracy:.1%} | {r.unextracted} |"
                    + (f" {r.forced} |" if guided else "") + (_spread_cells(r) if spread else ""))
    avg = averages(results, seen=seen)

    def line(label: str, names: list[str], value: float | None) -> str:
        if value is None:
            return ""
        n = sum(results[t].n for t in names)
        correct = sum(results[t].correct for t in names)
        unex = sum(results[t].unextracted for t in names)
        blank = " |" if has_split else ""
        forced = f" {sum(results[t].forced for t in names)} |" if guided else ""
        majorities = [results[t].majority for t in names]
        floor = (f" {_mean(majorities):.1%} | |" if None not in majorities else " - | |") if spread else ""
        return (f"| **{label}** ({len(names)} tasks) | |{blank} {n} | {correct} | **{value:.1%}** | {unex} |{forced}"
                + floor)

    if has_split:
        seen_names = [t for t in results if t in seen]
        unseen_names = [t for t in results if t not in seen]
        rows += [x for x in (line("average seen", seen_names, avg["seen"]),
                             line("average unseen", unseen_names, avg["unseen"])) if x]
    total = line("average all", list(results), avg["all"])
    if total:
        rows.append(total)
    return "\n".join(rows) + "\n"


__all__ = ["TaskResult", "accuracy_table", "averages", "evaluate_many", "evaluate_records", "gold_answer"]
