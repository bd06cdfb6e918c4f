"""Kernel benchmark in one command: base GEMM, fused Triton op (CUDA), grouped torch path, per-expert loop.

    python benchmarks/run_kernels.py --out docs/bench/kernels-gpu           # full sweep on CUDA
    python benchmarks/run_kernels.py --quick --out docs/bench/kernels-cpu   # ~2 minutes on a CPU

Writes kernels.json, kernels.md and kernels.png into --out (see modecotd_engine/bench/kernels.py).
Needs no network: every input is generated in the run.
"""

from __future__ import annotations

import argparse
import sys

from modecotd_engine.bench.kernels import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
