"""``modecotd-engine student``: load the frozen student and describe it, or convert a GGUF file first.

    modecotd-engine student                                  # the built-in SmolLM2-135M-Instruct
    modecotd-engine student --path ./my-llama --dtype bfloat16 --json
    modecotd-engine student --convert-gguf model.gguf --out ./students/model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from modecotd_engine.engine.gguf import convert_gguf
from modecotd_engine.engine.student import (
    DEFAULT_STUDENT_NAME,
    DTYPES,
    StudentError,
    describe_student,
    load_student,
    modecotd_home,
)
from modecotd_engine.engine.student_files import CONVERSION_FILE


def register(subparsers) -> None:
    """Add the ``student`` subcommand to an argparse subparsers object; its handler is ``run``."""
    parser = subparsers.add_parser(
        "student",
        help="load the frozen student and describe it (or convert a GGUF file into one)",
        description=(
            "Load a frozen student (a Hugging Face model directory with safetensors weights) and print "
            "its architecture, parameter count, dtype, device and linear layers. Without --path, the "
            "built-in SmolLM2-135M-Instruct is used, converted once from its GGUF file into "
            "$MODECOTD_HOME/students (default ~/.cache/modecotd-engine/students)."
        ),
    )
    parser.add_argument(
        "--path",
        type=Path,
        default=None,
        metavar="DIR",
        help="student directory: config.json, model.safetensors (or shards + index), tokenizer files "
        "(default: the built-in SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weight dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device such as cpu, cuda, cuda:1 (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--convert-gguf",
        type=Path,
        default=None,
        metavar="FILE",
        help="convert this GGUF file (dequantized to float32 safetensors) into --out, then describe the result",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output directory for --convert-gguf; must not exist (written atomically)",
    )
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON object instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handle ``student``: 0 on success, 1 on a bad student or file, 2 on a bad flag combination."""
    path = getattr(args, "path", None)
    source = getattr(args, "convert_gguf", None)
    out = getattr(args, "out", None)
    if (source is None) != (out is None):
        print("error: --convert-gguf FILE and --out DIR go together", file=sys.stderr)
        return 2
    if source is not None and path is not None:
        print("error: --path cannot be combined with --convert-gguf (--out is what gets described)", file=sys.stderr)
        return 2
    conversion = None
    if path is None and source is None and not (modecotd_home() / "students" / DEFAULT_STUDENT_NAME).exists():
        print("note: converting the built-in student from GGUF once (about half a minute)", file=sys.stderr)
    try:
        if source is not None:
            path = convert_gguf(source, out)
            conversion = json.loads((path / CONVERSION_FILE).read_text())
            conversion["bytes"] = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        student = load_student(path, dtype=getattr(args, "dtype", None), device=getattr(args, "device", None))
    except StudentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    if getattr(args, "json", False):
        report = {
            "path": str(student.path),
            "identity": student.identity,
            "dtype": str(student.dtype).removeprefix("torch."),
            "device": str(student.device),
            "frozen": all(not p.requires_grad for p in student.model.parameters()),
            "linear_shapes": {name: list(shape) for name, shape in student.linear_shapes().items()},
        }
        if conversion is not None:
            report["conversion"] = conversion
        print(json.dumps(report, indent=2))
    else:
        if conversion is not None:
            seconds, megabytes = conversion["seconds"], conversion["bytes"] / 1e6
            print(f"converted {source} -> {path} in {seconds:.1f} s ({megabytes:.1f} MB)")
        print(describe_student(student))
    return 0
