"""Compile every kernel config the autotuner would try, for sm_90 (H100/H200), on a machine without a GPU.

    python benchmarks/compile_sm90.py --out docs/bench/compile-sm90          # every shape below
    python benchmarks/compile_sm90.py --quick --out /tmp/compile-sm90        # one shape per regime

Triton compiles for a target it is not running on: this script installs a compile-only driver that
answers "sm_90" to Triton's target query, then drives the same launchers the engine calls
(``lora_mixture_triton`` forward and backward, ``routed_lora_mixture_triton``) with CPU tensors of the
real shapes. Every launch is turned into compilations of each config the autotuner would benchmark for
that shape (after the engine's own pruning, with the H200's shared-memory limit) instead of a run, so
the outputs are never computed. For each compiled kernel it records, from Triton's metadata and the
generated code:

* registers per thread and spilled bytes (``ptxas -v`` on the PTX, the ptxas Triton ships),
* shared memory (Triton's allocation) against the device limit,
* whether the main loops were software-pipelined: asynchronous global->shared copies
  (``cp.async`` / TMA) and Hopper warp-group MMAs (``wgmma``) in the PTX.

Writes ``compile.json`` and ``compile.md`` into --out. No GPU is needed and none is used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_sm90.py compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# H100 / H200 (sm_90): 228 KiB of shared memory per SM, 227 KiB (232,448 bytes) usable by one block.
H200_SMEM = 232_448
TARGET = GPUTarget("cuda", 90, 32)


class CompileOnlyDriver:
    """What Triton's JIT asks of a driver before it launches: the target, a device and a stream.
    Launching itself is never reached (every run is a warm-up, i.e. a compilation)."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class Recorder:
    """Turns launches into compilations: autotuned kernels compile every config the autotuner would
    benchmark for the call's shape, plain kernels their one specialisation."""

    def __init__(self):
        self.records: list[dict] = []
        self.label = ""
        self._seen: set = set()
        self._jit_run = JITFunction.run

    def install(self):
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            kernel = rec._jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            rec.add(fn, kernel, kwargs, time.perf_counter() - t0)
            return kernel

        def autotune(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            for config in configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        JITFunction.run = run
        Autotuner.run = autotune

    def add(self, fn, kernel, kwargs, seconds):
        meta = kernel.metadata
        blocks = {k: v for k, v in kwargs.items() if k.isupper() and k.startswith(("BLOCK", "GROUP"))}
        key = (self.label, fn.__name__, json.dumps(blocks, sort_keys=True), meta.num_warps, meta.num_stages,
               meta.hash)
        if key in self._seen:
            return
        self._seen.add(key)
        ptx = kernel.asm["ptx"]
        self.records.append({
            "case": self.label, "kernel": fn.__name__, "blocks": blocks, "num_warps": meta.num_warps,
            "num_stages": meta.num_stages, "shared": meta.shared, **ptxas_usage(ptx),
            "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx)),
            "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
            "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
            "compile_s": round(seconds, 2),
        })


def ptxas_usage(ptx: str) -> dict:
    """Registers and spills of the PTX, as ptxas reports them for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0}


def patch_engine():
    """The launchers refuse CPU tensors outside the interpreter, and size configs by the device's
    shared memory, which has no driver to ask here: accept the tensors, answer the H200's limit."""
    from modecotd_engine.kernels import triton_configs, triton_lora, triton_router, triton_utils

    for mod in (triton_lora, triton_router, triton_utils):
        if hasattr(mod, "check_supported"):
            mod.check_supported = lambda *a, **k: None
    for mod in (triton_configs, triton_router):
        if hasattr(mod, "smem_limit"):
            mod.smem_limit = lambda: H200_SMEM


# (label, T, K, N, E, r): SmolLM2-135M's q_proj (576 -> 576) and down_proj (1536 -> 576) at decode,
# prefill and a training batch; the kernel benchmark's 4096 x 4096 layer with 10 experts of rank 16.
SHAPES = [
    ("smollm-q decode", 8, 576, 576, 7, 8),
    ("smollm-q prefill", 512, 576, 576, 7, 8),
    ("smollm-down train", 4096, 1536, 576, 7, 8),
    ("4096 decode", 16, 4096, 4096, 10, 16),
    ("4096 batch", 256, 4096, 4096, 10, 16),
    ("4096 train", 4096, 4096, 4096, 10, 16),
]
QUICK = ("smollm-q decode", "4096 train")


def drive(rec: Recorder, shapes, modes=("output", "weight")) -> None:
    from modecotd_engine.kernels.triton_lora import lora_mixture_triton
    from modecotd_engine.kernels.triton_router import routed_lora_mixture_triton

    g = torch.Generator().manual_seed(0)
    for label, t, k, n, e, r in shapes:
        x = torch.randn(t, k, generator=g).to(torch.bfloat16)
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        for mode in modes:
            # inference: bf16 experts, forward only
            a, b = torch.randn(e, r, k).to(torch.bfloat16), torch.randn(e, n, r).to(torch.bfloat16)
            gates = torch.rand(t, e, generator=g).to(torch.bfloat16)
            rec.label = f"{label} | {mode} | fwd bf16"
            lora_mixture_triton(x, w, None, a, b, gates, 2.0, mode)
            # training: fp32 experts next to bf16 activations, forward and backward
            a32 = torch.randn(e, r, k).requires_grad_()
            b32 = torch.randn(e, n, r).requires_grad_()
            rec.label = f"{label} | {mode} | train fp32 experts"
            y = lora_mixture_triton(x, w, None, a32, b32, gates.float(), 2.0, mode)
            y.float().sum().backward()
        rec.label = f"{label} | routed top-2 | train fp32 experts"
        router = torch.randn(e, k).requires_grad_()
        a32 = torch.randn(e, r, k).requires_grad_()
        b32 = torch.randn(e, n, r).requires_grad_()
        y = routed_lora_mixture_triton(x, w, None, a32, b32, router, 2.0, top_k=2)
        y.float().sum().backward()


def markdown(records: list[dict], header: list[str]) -> str:
    rows = ["| shape | mixing | pass | kernel | blocks | warps | stages | shared (B) | regs | spill st/ld (B) | cp.async |"
            " TMA | wgmma | mma.sync |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        blocks = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["blocks"].items())
        rows.append(f"| {r['case']} | {r['kernel'].strip('_')} | {blocks} | {r['num_warps']} | {r['num_stages']} | "
                    f"{r['shared']:,} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['cp_async']} | "
                    f"{r['tma']} | {r['wgmma']} | {r['mma_sync']} |")
    over = [r for r in records if r["shared"] > H200_SMEM]
    spills = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    # kernels whose compiled code has a dot in a loop but no asynchronous global->shared copy
    dots = {r["kernel"] for r in records if r["wgmma"] or r["mma_sync"]}
    unpiped = sorted({k.strip("_") for k in dots if not any(r["cp_async"] or r["tma"] for r in records if r["kernel"] == k)})
    summary = [f"- {len(records)} kernel compilations; over the H200's {H200_SMEM:,} B of shared memory: {len(over)}; "
               f"with register spills: {len(spills)}.",
               "- kernels with tensor-core dots but no asynchronous copy in any compiled config (loops not "
               "software-pipelined): " + (", ".join(unpiped) or "none") + "."]
    return "\n".join([*header, "", *summary, "", *rows, ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for compile.json and compile.md")
    p.add_argument("--quick", action="store_true", help=f"only the shapes {', '.join(QUICK)}")
    args = p.parse_args(argv)
    driver.set_active(CompileOnlyDriver())
    patch_engine()
    rec = Recorder()
    rec.install()
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    t0 = time.perf_counter()
    drive(rec, shapes)
    seconds = time.perf_counter() - t0
    header = ["# Kernels compiled for sm_90 (no GPU)", "",
              f"- command: `python benchmarks/compile_sm90.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; triton {triton.__version__}, "
              f"torch {torch.__version__}; target sm_90 (ptxas -v for sm_90a), shared-memory limit {H200_SMEM:,} B; "
              f"{seconds:.0f} s on the CPU",
              "- every config the autotuner would benchmark per shape, after the engine's pruning; `fwd bf16` is "
              "inference (bf16 experts), `train fp32 experts` the forward and backward of a training step"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps({"header": header, "records": rec.records}, indent=1) + "\n")
    (out / "compile.md").write_text(markdown(rec.records, header))
    print(markdown(rec.records, header)[:4000])
    print(f"written: {out / 'compile.md'}, {out / 'compile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
