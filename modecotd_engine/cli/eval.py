"""`modecotd-engine eval`: accuracy of the student, an expert, mixtures or each task's own expert.

Every task's records are generated in shared mixed batches (each task with its own gate), the
answers are extracted and scored, and the run writes under ``--out``:

* ``predictions/<task>.jsonl``: one line per record (input, gold, extracted prediction, generation,
  correct, tokens, finish reason);
* ``summary.json``: per-task scores, seen/unseen averages, settings, student and bank;
* ``results.md``: the markdown accuracy table (also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
import time
from pathlib import Path

from ..engine.answers import TASK_TYPES
from ..engine.atomic import atomic_write_text
from ..engine.selection import GenerationError, Selection, frozen_selection, mixture_selection, spec_selection
from .infer import add_generation_args, add_model_args, generation_config, load_model

_DESCRIPTION = """\
Score generations on evaluation files. Each record is {"input", "output"} where "output" is the gold
answer, or a full training output (its gold is then the text after the last '-->' up to END).
The answer of a generation is the text after its last '-->' up to END; without the marker a rule per
task type applies (last number, last choice letter A-F, yes/no, quoted string, last line). Answers
are compared exactly after normalisation (numbers within 1e-4, letters and yes/no case-insensitive).

Expert selection (one of; default: the frozen student):
  --experts SPEC   the same experts for every task
  --mixture FILE   the same mixture for every task
  --mixtures DIR   one mixture per task, DIR/<task>.json
  --per-task       each task's own expert (the expert named like the task)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy on evaluation files (per-task table, seen/unseen averages)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bank", default=None, help="expert bank directory (needed for any expert selection)")
    p.add_argument("--data", required=True,
                   help="an evaluation file NAME.json/NAME.jsonl (task NAME) or a directory of them "
                   "(a directory holding only an eval/ subdirectory, as written by 'data', is read from eval/)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--experts", default=None, metavar="SPEC",
                     help="experts for every task: 'a', 'a,b' (equal weights) or 'a=0.7,b=-0.2'")
    sel.add_argument("--mixture", default=None, metavar="FILE", help="one mixture file for every task")
    sel.add_argument("--mixtures", default=None, metavar="DIR",
                     help="directory of mixture files, one per task, named <task>.json")
    sel.add_argument("--per-task", action="store_true",
                     help="serve each task with its own expert (the bank's expert named like the task)")
    p.add_argument("--tasks", default="", help="comma-separated subset of the tasks found in --data (default: all)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N records of each task")
    p.add_argument("--task-type", choices=TASK_TYPES, default=None,
                   help="answer type for every task (default: from the task name, else inferred from the gold "
                   "answers: all numbers = arithmetic, all A-F = choice, all yes/no = boolean)")
    p.add_argument("--compat-substring", action="store_true",
                   help="score as the original MoDE-CoTD evaluator: a prediction is correct when the gold string "
                   "occurs anywhere in the generated answer text, so '26' counts as correct for gold '2' and "
                   "'C END' for gold 'C'; more lenient than the default exact comparison, kept to reproduce "
                   "published numbers")
    p.add_argument("--seen", default=None, metavar="A,B,...",
                   help="comma-separated seen tasks (they have their own expert) for the seen/unseen averages; "
                   "default: the tasks named like an expert of the bank")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: predictions/<task>.jsonl, summary.json, results.md")
    add_model_args(p)
    add_generation_args(p, max_new_tokens=256, sampling=True)
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="generations per record; K > 1 scores the majority answer over them (self-consistency "
                   "voting; needs --temperature > 0, e.g. 0.7). Default 1: greedy, one generation")
    p.add_argument("--guide-answers", action="store_true",
                   help="guided answers: after the '-->' marker only an answer of the task's type may follow (a "
                   "choice question's option letters, Yes/No, a number) and END; a generation about to end "
                   "without any answer (EOS, a loop, the token budget) gets the marker written for it and "
                   "answers the same way (finish reason 'forced', counted in the results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_eval_data(path: str, *, tasks: str = "", limit: int | None = None) -> dict[str, list[dict]]:
    """Task name -> records from an evaluation file or directory (gold answers or training outputs)."""
    from ..engine.data import DataError, read_task_dir, read_task_file, task_files_in

    p = Path(path)
    if p.is_file():
        found = {p.stem: read_task_file(p, require_marker=False)}
    elif p.is_dir():
        if not task_files_in(p) and (p / "eval").is_dir():
            p = p / "eval"
        found = read_task_dir(p, require_marker=False)
    else:
        raise DataError("no such file or directory", path=p)
    data = {name: tf.records for name, tf in found.items()}
    if tasks:
        want = [t.strip() for t in tasks.split(",") if t.strip()]
        missing = [t for t in want if t not in data]
        if missing:
            raise DataError(f"tasks not found: {', '.join(missing)} (found: {', '.join(data)})", path=p)
        data = {t: data[t] for t in want}
    if limit is not None:
        if limit < 1:
            raise GenerationError(f"--limit must be >= 1, got {limit}")
        data = {t: recs[:limit] for t, recs in data.items()}
    return data


def _selections(args, tasks: list[str], bank) -> dict[str, Selection]:
    if args.experts:
        s = spec_selection(args.experts, bank, args.mode)
        return {t: s for t in tasks}
    if args.mixture:
        s = mixture_selection(args.mixture, bank, args.bank, args.mode)
        return {t: s for t in tasks}
    if args.mixtures:
        d = Path(args.mixtures)
        if not d.is_dir():
            raise FileNotFoundError(f"mixtures directory not found: {d}")
        missing = [t for t in tasks if not (d / f"{t}.json").is_file()]
        if missing:
            raise GenerationError(f"{d}: no mixture for task(s) {', '.join(missing)} (expected <task>.json)")
        return {t: mixture_selection(str(d / f"{t}.json"), bank, args.bank, args.mode) for t in tasks}
    if args.per_task:
        missing = [t for t in tasks if t not in bank.names]
        if missing:
            raise GenerationError(
                f"--per-task: task(s) {', '.join(missing)} have no expert of their own in the bank "
                f"(experts: {', '.join(bank.names)}); serve them with --mixtures, or evaluate them separately"
            )
        return {t: spec_selection(t, bank, args.mode) for t in tasks}
    s = frozen_selection(bank)
    return {t: s for t in tasks}


def run(args) -> int:
    from ..engine.evaluate import accuracy_table, averages, evaluate_many
    from ..engine.mixture import load_router_state

    generation_config(args)  # bad flags fail before the student loads
    if args.samples < 1 or (args.samples > 1 and args.temperature <= 0):
        raise GenerationError(f"--samples {args.samples}: needs K >= 1, and --temperature > 0 when K > 1 "
                              "(greedy samples would all be the same)")
    data = load_eval_data(args.data, tasks=args.tasks, limit=args.limit)
    need_bank = bool(args.experts or args.mixture or args.mixtures or args.per_task)
    student, bank, handle = load_model(args, need_bank=need_bank)
    config = dataclasses.replace(generation_config(args, bank), guide_answers=args.guide_answers)
    selections = _selections(args, list(data), bank)
    if args.seen is not None:
        seen = {t.strip() for t in args.seen.split(",") if t.strip()}
    else:
        seen = {t for t in data if t in bank.names} if bank is not None else None

    # One shared mixed-batch evaluation for every gated selection (each row with its own mode), and
    # one per router mixture (a router is model-wide).
    groups: dict[tuple, list[str]] = {}
    for t, s in selections.items():
        groups.setdefault(s.group, []).append(t)
    t0 = time.perf_counter()
    results = {}
    for (mode, _router), names in groups.items():
        sel0 = selections[names[0]]
        if handle is not None and sel0.router is not None:
            handle.set_mode(mode)
            handle.attach_router(load_router_state(sel0.router), top_k=sel0.router.top_k)
        try:
            gates = modes = None
            if handle is not None and sel0.router is None:
                gates = {t: selections[t].gate for t in names}
                modes = {t: selections[t].mode for t in names}
            types = {t: args.task_type for t in names} if args.task_type else None
            results.update(evaluate_many(student.model, student.tokenizer, {t: data[t] for t in names},
                                         task_types=types, handle=handle, gates=gates, config=config,
                                         compat_substring=args.compat_substring, samples=args.samples,
                                         progress=not args.no_progress and sys.stderr.isatty(), modes=modes))
        finally:
            if handle is not None and sel0.router is not None:
                handle.detach_router()
    seconds = time.perf_counter() - t0
    results = {t: results[t] for t in data}

    out = Path(args.out)
    for t, r in results.items():
        body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in r.predictions)
        atomic_write_text(out / "predictions" / f"{t}.jsonl", body)
    table = accuracy_table(results, seen=seen)
    tokens = sum(p["num_tokens"] for r in results.values() for p in r.predictions)
    scoring = "substring (original evaluator)" if args.compat_substring else "exact"
    summary = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "student": student.identity,
        "student_path": str(student.path),
        "bank": str(args.bank) if args.bank else None,
        "data": str(args.data),
        "selection": _selection_label(args),
        "scoring": scoring,
        "generation": {"max_new_tokens": config.max_new_tokens, "stop_strings": list(config.stop_strings),
                       "batch_size": config.batch_size, "greedy": config.greedy, "temperature": config.temperature,
                       "top_p": config.top_p, "seed": config.seed, "samples": args.samples,
                       "prompt_format": config.prompt_format,
                       "repetition_penalty": config.repetition_penalty,
                       "stop_after_answer": config.stop_after_answer, "stop_on_loop": config.stop_on_loop,
                       "guide_answers": config.guide_answers},
        "tasks": {t: dict(r.summary(), seen=(t in seen) if seen is not None else None,
                          experts=selections[t].label, mode=selections[t].mode) for t, r in results.items()},
        "averages": averages(results, seen=seen),
        "seconds": seconds,
        "generated_tokens": tokens,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    header = (f"# Evaluation: {summary['selection']}\n\nstudent {student.identity.get('name', '?')}, "
              f"data {args.data}, scoring {scoring}, {summary['date']}\n\n")
    atomic_write_text(out / "results.md", header + table)
    print(table, end="")
    print(f"{sum(r.n for r in results.values())} records, {tokens} generated tokens in {seconds:.1f} s; "
          f"written to {out}/ (results.md, summary.json, predictions/)", file=sys.stderr)
    return 0


def _selection_label(args) -> str:
    if args.experts:
        return f"experts {args.experts}"
    if args.mixture:
        return f"mixture {args.mixture}"
    if args.mixtures:
        return f"per-task mixtures from {args.mixtures}"
    if args.per_task:
        return "each task's own expert"
    return "frozen student"
