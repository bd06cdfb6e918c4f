"""Plumbing shared by the Triton kernel files (``triton_lora.py``, ``triton_router.py``): the interpreter
flag, the dtypes served, the launch plan of one call, the input checks of the launchers, and buffer
allocation. No kernels here; the autotune tables are in ``triton_configs.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .args import MODES, TRITON_DTYPES

# Read once at import, as Triton reads it when the kernel modules' @triton.jit decorators run.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = TRITON_DTYPES

# Columns of one grouped low-rank tile (experts_per_tile * padded rank). 128 keeps the expand tail
# tile (BM x 128 and 128 x BN) and the two backward-shrink accumulators within register/smem budgets.
# The interpreter uses 32 so the small test shapes (E=3, r=5) exercise several expert groups;
# make_plan reads GROUP_COLS when called, so a test can run the GPU's grouping under the interpreter.
GPU_GROUP_COLS = 128
INTERPRET_GROUP_COLS = 32
GROUP_COLS = INTERPRET_GROUP_COLS if INTERPRET else GPU_GROUP_COLS
# Autotune key buckets for the token count: decode (<= 16), small batches, prefill / training.
T_BUCKETS = (16, 64, 256, 1024)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def t_bucket(t: int) -> int:
    for b in T_BUCKETS:
        if t <= b:
            return b
    return 4096


@dataclass(frozen=True)
class Plan:
    """Launch constants shared by the kernels of one call."""

    block_r: int  # padded rank (pow2 >= 16)
    ept: int  # experts per grouped tile
    e_pad: int  # pow2 >= E, >= 2
    prec: str  # tl.dot input precision
    t_bucket: int  # autotune key bucket of T


def make_plan(t: int, num_experts: int, rank: int, dtype: torch.dtype) -> Plan:
    block_r = max(16, next_pow2(rank))
    ept = max(1, min(next_pow2(num_experts), GROUP_COLS // block_r))
    prec = "tf32"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        prec = "ieee"  # torch's fp32 matmul is full fp32 unless TF32 is allowed
    return Plan(block_r, ept, max(2, next_pow2(num_experts)), prec, t_bucket(t))


def check_supported(x, weight, bias, lora_a, lora_b, gates, mode) -> None:
    """Raise ValueError for inputs these kernels cannot serve (shapes are checked by the caller).
    ``gates`` None: the routed op, which computes its gates in the kernel."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if gates is not None:
        named["gates"] = gates
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"triton backend: {name} has dtype {t.dtype}; supported are float16, bfloat16 and "
                "float32 (use backend='torch' for other dtypes)"
            )
        if INTERPRET and t.dtype == torch.bfloat16:
            raise ValueError(
                f"triton backend: {name} is bfloat16, which Triton's CPU interpreter cannot compute "
                "(TRITON_INTERPRET=1); use float16/float32 there or run on CUDA"
            )
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"triton backend: {name} is on {t.device}; the kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1 set before import for the CPU interpreter)"
            )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"triton backend: weight/bias dtype must equal x dtype {x.dtype}")
    if x.dim() != 2 or (gates is not None and gates.dim() != 2):
        raise ValueError("triton launchers take 2-D x (T, K) and gates (T, E); flatten leading dims first")


def alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised buffer; NaN-filled under the interpreter so a read of an unwritten element
    (a gate-mask mismatch between producer and consumer tiles) poisons the result in tests."""
    if INTERPRET:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the last dim keeps the big operand loads vectorised; copy only if needed."""
    return t if t.stride(-1) == 1 else t.contiguous()
