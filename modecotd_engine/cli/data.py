"""``modecotd-engine data``: write the built-in tasks as files, and check task files.

    modecotd-engine data builtin --out data/builtin --n-train 200 --n-eval 50 --seed 0
    modecotd-engine data check data/builtin/train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modecotd_engine.engine.answers import infer_task_type, split_output
from modecotd_engine.engine.data import (
    MISSING_MARKER_POLICIES,
    DataError,
    TaskFile,
    length_summary,
    read_task_dir,
    read_task_file,
    task_files_in,
)
from modecotd_engine.engine.tasks import BUILTIN_TASKS, write_builtin


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command (subcommands ``builtin`` and ``check``) to a subparsers object."""
    p = subparsers.add_parser(
        "data", help="write the built-in tasks as files; check task files",
        description="Write the built-in reasoning tasks as task files, or check task files.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="{builtin,check}", required=True)

    b = sub.add_parser(
        "builtin", help="write the built-in tasks (train/, eval/, shots/, tasks.json) to a directory",
        description="Write the built-in tasks: OUT/train/<task>.jsonl for seen tasks, OUT/eval/<task>.jsonl "
        "(gold answers) and OUT/shots/<task>.jsonl (few-shot examples for mixing) for all tasks, and "
        "OUT/tasks.json (types, seen/unseen). Tasks: " + ", ".join(BUILTIN_TASKS) + ".",
    )
    b.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created)")
    b.add_argument(
        "--n-train", type=int, metavar="N", default=200, help="training records per seen task (default: 200)"
    )
    b.add_argument("--n-eval", type=int, metavar="N", default=50, help="evaluation records per task (default: 50)")
    b.add_argument("--n-shots", type=int, metavar="N", default=5, help="few-shot records per task (default: 5)")
    b.add_argument("--seed", type=int, metavar="S", default=0, help="generation seed (default: 0)")
    b.set_defaults(func=run_builtin)

    c = sub.add_parser(
        "check", help="read task files and print per-task record counts",
        description="Read a task file, a directory of task files, or a directory whose subdirectories hold "
        "task files (as `data builtin` writes: then files beside the subdirectories are not read), and print "
        "per-task counts. Exit status 1 on bad data.",
    )
    c.add_argument("path", type=Path, help="a NAME.json/NAME.jsonl file or a directory")
    c.add_argument(
        "--missing-marker", choices=MISSING_MARKER_POLICIES, default="keep",
        help="outputs without the '-->' answer marker: count and keep them (default), drop them, "
        "or fail with an error",
    )
    c.set_defaults(func=run_check)
    return p


def _check_positive(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def run_builtin(args: argparse.Namespace) -> int:
    """Write the built-in tasks; print what was written. Returns the exit status."""
    try:
        _check_positive("--n-train", args.n_train, 1)
        _check_positive("--n-eval", args.n_eval, 1)
        _check_positive("--n-shots", args.n_shots, 1)
        manifest = write_builtin(args.out, n_train=args.n_train, n_eval=args.n_eval, n_shots=args.n_shots,
                                 seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote built-in tasks to {args.out} (seed {args.seed})")
    for name, info in manifest["tasks"].items():
        files = [f"{rel} ({n})" for rel, n in manifest["files"].items() if rel.endswith(f"/{name}.jsonl")]
        kind = "seen" if info["seen"] else "unseen"
        print(f"  {name:<14} {info['type']:<10} {kind:<6} {', '.join(files)}")
    print(f"  {args.out / 'tasks.json'}")
    return 0


def _summary_row(tf: TaskFile) -> str:
    golds = []
    for rec in tf.records:
        split = split_output(rec["output"])
        golds.append(split[1] if split is not None else rec["output"].strip())
    task_type = infer_task_type(tf.name, golds, default="text")
    inp = length_summary(len(r["input"]) for r in tf.records)
    out = length_summary(len(r["output"]) for r in tf.records)
    return (f"  {tf.name:<28} {len(tf.records):>7} {tf.missing_marker:>8}  {task_type:<10} "
            f"{inp['mean']:>7.0f} {inp['max']:>7} {out['mean']:>7.0f} {out['max']:>7}")


def _read_groups(path: Path, missing_marker: str) -> list[tuple[Path, dict[str, TaskFile]]]:
    kw = dict(require_marker=True, missing_marker=missing_marker)
    if path.is_file():
        return [(path.parent, {path.stem: read_task_file(path, **kw)})]
    if not path.is_dir():
        raise DataError("no such file or directory", path=path)
    # The layout `data builtin` writes (train/, eval/, shots/ and a tasks.json manifest): check the
    # subdirectories; files beside them are metadata, not tasks.
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".") and task_files_in(d)]
    if subdirs:
        return [(d, read_task_dir(d, **kw)) for d in subdirs]
    return [(path, read_task_dir(path, **kw))]


def run_check(args: argparse.Namespace) -> int:
    """Read task files and print per-task counts. Returns the exit status (1 on bad data)."""
    try:
        groups = _read_groups(args.path, args.missing_marker)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = (f"  {'task':<28} {'records':>7} {'no -->':>8}  {'type':<10} "
              f"{'in avg':>7} {'in max':>7} {'out avg':>7} {'out max':>7}   (lengths in characters)")
    total = 0
    for directory, tasks in groups:
        print(f"{directory}:")
        print(header)
        for tf in tasks.values():
            print(_summary_row(tf))
            total += len(tf.records)
    print(f"{sum(len(t) for _, t in groups)} task file(s), {total} record(s)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``data`` to its subcommand."""
    return args.func(args)
