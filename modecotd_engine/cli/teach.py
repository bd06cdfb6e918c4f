"""``modecotd-engine teach``: a teacher writes rationales for a task's questions; the right ones are kept."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..engine.answers import TASK_TYPES

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # the teacher refused the run or became unreachable, or it was interrupted
EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3  # the run ended but some questions failed; --resume retries them


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``teach`` subcommand to a ``modecotd-engine`` subparser set; its handler is ``run``."""
    p = subparsers.add_parser(
        "teach",
        help="have a teacher write chain-of-thought rationales; keep those with the right answer",
        description=(
            "Prompt a teacher (a local Hugging Face model directory or an OpenAI-compatible endpoint) "
            "for chain-of-thought rationales of a task's questions, keep the samples whose final answer "
            "matches the gold answer, and append them as training records {input, output} to --out. "
            "Writes <out>.done (finished questions) and <out>.summary.json beside it."
        ),
        epilog=(
            f"exit status: {EXIT_OK} done, {EXIT_BAD_INPUT} bad input, {EXIT_FAILED} the teacher refused "
            f"or went away (what was written stays; continue with --resume), {EXIT_INCOMPLETE} finished "
            "with failed questions (--resume retries them)"
        ),
    )
    p.add_argument("--teacher", required=True, metavar="DIR|URL",
                   help="a Hugging Face causal LM directory, 'builtin' for the built-in student, or an "
                        "OpenAI-compatible API base such as http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="model name sent to an HTTP teacher (default: the first one its /models lists)")
    p.add_argument("--questions", required=True, type=Path, metavar="FILE",
                   help="JSON list or JSONL of {input, output} (evaluation format) or {question, answer} records")
    p.add_argument("--out", required=True, type=Path, metavar="FILE",
                   help="output JSONL of training records; an existing file needs --resume")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="rationales sampled per question (default 1)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature; 0 is greedy (default 0 for one sample, 0.7 for more)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="longest rationale, in tokens (default 256)")
    p.add_argument("--template", type=Path, default=None, metavar="FILE",
                   help="prompt template file formatted with {question} (default: "
                        "\"Q: {question}\\nA: Let's think step by step.\")")
    p.add_argument("--completions", action="store_true",
                   help="plain-text prompts: the HTTP /completions endpoint instead of /chat/completions, "
                        "and no chat template for a local teacher")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="name of the environment variable that holds the HTTP API key (sent as a Bearer token)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="HTTP requests in flight at once (default 8)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="HTTP socket timeout per request, in seconds (default 60)")
    p.add_argument("--retries", type=int, default=4, metavar="N",
                   help="HTTP retries after a failed attempt (429, 5xx, timeout, bad JSON; default 4)")
    p.add_argument("--resume", action="store_true",
                   help="continue an existing --out, skipping the questions it already finished")
    p.add_argument("--task-type", choices=TASK_TYPES, default=None,
                   help="answer type of the task (default: inferred from the task name and gold answers)")
    p.add_argument("--task", default=None, metavar="NAME", help="task name (default: the questions file stem)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="questions per generate call of a local teacher (default 8)")
    p.add_argument("--device", default=None, metavar="DEV",
                   help="device of a local teacher, e.g. cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="dtype of a local teacher, e.g. bfloat16 or float32 (default: the loader's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handle ``modecotd-engine teach``; returns the exit status."""
    from ..engine.teach import TeachError, TeacherError, load_template, make_teacher, summary_path, teach

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: environment variable {args.api_key_env} (from --api-key-env) is not set or empty",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        template = load_template(args.template) if args.template is not None else None
        teacher = make_teacher(
            args.teacher, model=args.model, api_key=api_key, completions=args.completions,
            concurrency=args.concurrency, timeout=args.timeout, retries=args.retries,
            batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        )
    except TeacherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TeachError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    log.info("teacher: %s", teacher.description)

    try:
        summary = teach(
            args.questions, args.out, teacher,
            samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            template=template, resume=args.resume, task=args.task, task_type=args.task_type,
            seed=args.seed, progress=not args.no_progress,
        )
    except TeacherError as exc:
        if exc.summary is not None:
            print(f"teach {exc.summary.line()}")
        print(f"error: {exc}", file=sys.stderr)
        print(f"what was written is kept; rerun with --resume to continue {args.out}", file=sys.stderr)
        return EXIT_FAILED
    except TeachError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"interrupted; rerun with --resume to continue {args.out}", file=sys.stderr)
        return 130

    print(f"teach {summary.line()}")
    print(f"wrote {summary.records} records to {args.out}; summary {summary_path(args.out)}")
    if summary.failed:
        print(f"{summary.failed} questions failed (see the summary); rerun with --resume to retry them",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK
