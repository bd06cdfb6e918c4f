"""`modecotd-engine reproduce`: the MoDE-CoTD protocol end to end over a data layout."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..engine.data import PROMPT_FORMATS
from ..engine.reproduce import PROFILES, SKIPPABLE, Profile, ReproduceConfig, reproduce

_DESCRIPTION = """\
Run the paper's protocol over a MoDE-CoTD data layout (train/ teacher rationales of the seen tasks,
learn/ a few shots per task, an evaluation directory of unseen tasks): the frozen student, every seen
task's expert (trained at once), the multi-task LoRA baseline, weight searches for every task with
shots (weight and output composition, checked by generation), the uniform average, and one report
(report.md, report.png) with per-task accuracy, seen/unseen averages and the rate of generations
without an answer. Each stage is skipped when its files exist: run the same command again to continue.

Profiles: cpu (7 small seen tasks, rank 8 on every linear layer, 480 steps, 40 held-out and 40 unseen
records per task; about 80 minutes on a 2-core CPU) and full (every seen task, 5 epochs, lr 5e-4,
batch 16, all records). ``--set targets=q_proj,v_proj --set steps=240`` gives the older, cheaper cpu
profile; ``--set val=20 --set snapshots=4`` holds 20 more records per seen task out for validation and
chooses each expert's step among 4 evenly spaced snapshots by its accuracy on them (the select stage).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="the MoDE-CoTD protocol end to end on a data layout, one report",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the layout's root (train/, learn/, dev-unseen/)")
    p.add_argument("--out", required=True, help="run directory (data/, experts/, multitask/, mixtures/, eval/, "
                   "report.md); an existing one is continued")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="how much to run (default: cpu)")
    p.add_argument("--tasks", default="", help="comma-separated seen tasks (default: the profile's; full: all of train/)")
    p.add_argument("--unseen", default="", help="comma-separated unseen tasks (default: every task of the evaluation "
                   "directory without training data)")
    p.add_argument("--eval-dir", default="dev-unseen",
                   help="evaluation directory of the unseen tasks, relative to --data (default: dev-unseen)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat",
                   help="how every system sees its prompts: chat = the student's chat template (default), plain")
    p.add_argument("--student", default=None, help="student directory (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and search (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a profile field, e.g. --set steps=400 --set eval_limit=100 (fields: "
                   + ", ".join(f.name for f in fields(Profile)) + ")")
    p.add_argument("--skip", default="", metavar="SYSTEM[,SYSTEM]",
                   help="systems not to build or evaluate, to save time (" + ", ".join(SKIPPABLE) + "); the report "
                   "leaves their columns out; a later command without --skip builds them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _overrides(items: list[str]) -> dict:
    types = {f.name: f.type for f in fields(Profile)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        kind = str(types[key])
        if "tuple" in kind:
            out[key] = tuple(v for v in value.split(",") if v)
        elif "float" in kind:
            out[key] = float(value)
        elif "bool" in kind:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--set {item!r}: {key} takes true or false")
            out[key] = value.lower() in ("true", "1", "yes")
        else:
            out[key] = int(value)
    return out


def _header(prof: Profile) -> list[str]:
    import datetime
    import shlex
    import sys

    import torch

    from ..bench.common import device_name, versions

    v = versions()
    command = "modecotd-engine " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return [f"- command: `{command}`",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
            f"{device_name(torch.device('cpu'))}; python {v['python']}, torch {v['torch']}, "
            f"transformers {v['transformers']}",
            f"- profile: {prof.steps or f'{prof.epochs:g} epochs of'} steps, batch {prof.batch_size}, lr {prof.lr:g}, "
            f"rank {prof.rank} on {', '.join(prof.targets)}, max length {prof.max_len}"
            f"{f', the first {prof.train_cap} training records per task' if prof.train_cap else ''}; "
            f"{prof.heldout} records per seen "
            f"task held out of train/, {prof.eval_limit or 'all'} evaluated per task"
            f"{_select_words(prof)}"
            "; greedy decoding"
            f"{' with guided answers' if prof.guide_answers else ''}, "
            f"{prof.max_new_tokens} new tokens at most; search budget {prof.budget}, {prof.finalists} finalists"]


def _select_words(prof: Profile) -> str:
    if not prof.selects_steps:
        return ""
    return f", {prof.val} more held out as validation records choosing each expert among {prof.snapshots} snapshots"


def run(args) -> int:
    cfg = ReproduceConfig(data=args.data, out=args.out, profile=args.profile,
                          tasks=tuple(t for t in args.tasks.split(",") if t),
                          unseen=tuple(t for t in args.unseen.split(",") if t), eval_dir=args.eval_dir,
                          prompt_format=args.prompt_format, student=args.student, seed=args.seed,
                          progress=not args.no_progress, overrides=_overrides(args.set),
                          skip=tuple(t for t in args.skip.split(",") if t))
    prof = cfg.resolved_profile()  # a bad profile or field fails before anything runs
    report = reproduce(cfg, header=_header(prof))
    print(report.read_text())
    print(f"report: {report} (and {report.with_suffix('.png').name})")
    return 0
