"""`modecotd-engine`: the command-line entry point (thin: parse, call the engine, print)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__

# Each module exposes register(subparsers) and sets args.func; the order is the order of --help.
_COMMANDS = ("student", "data", "teach", "train", "experts", "mix", "infer", "eval", "serve", "reproduce", "bench")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="modecotd-engine",
        description="Distill chain-of-thought reasoning into a frozen small student through one LoRA expert "
        "per task, then mix the experts for seen and unseen tasks (MoDE-CoTD).",
        epilog="Typical pipeline: teach (optional) -> train -> mix -> infer / eval / serve; bench measures the "
        "kernels and the pipeline. 'modecotd-engine COMMAND --help' explains each command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: print the message, not a traceback."""
    from ..engine.data import DataError
    from ..engine.experts import ExpertBankError
    from ..engine.student import StudentError
    from ..kernels import BackendUnavailableError

    return (StudentError, DataError, ExpertBankError, BackendUnavailableError, FileNotFoundError,
            FileExistsError, ValueError)


def main(argv: list[str] | None = None) -> int:
    # Every entry point (the console script too): the Rust tokenizer's thread pool next to torch's
    # threads warns after a fork (DataLoader workers, torchrun) and oversubscribes small machines.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"modecotd-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
