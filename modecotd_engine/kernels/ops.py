"""Public entry point of the gated multi-LoRA-expert linear layer, with backend dispatch.

``backend="auto"`` takes the Triton kernels when the tensors live on a CUDA device and the torch
grouped path otherwise (the only path Triton can serve on CPU is its interpreter, which is for
tests). The choice is logged once. An explicit request that cannot be served raises
:class:`BackendUnavailableError`; nothing falls back silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from .reference import MODES, lora_mixture_torch, single_expert_lora_torch

log = logging.getLogger("modecotd_engine.kernels")

BACKENDS = ("auto", "torch", "triton")
MAX_EXPERTS = 64
MAX_RANK = 128
_logged_auto: set[str] = set()
# What the Triton kernels compute in; other dtypes (float64) stay on the torch path.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve these tensors."""


class UnsupportedDtypeError(BackendUnavailableError, ValueError):
    """The requested backend has no kernel for a tensor's dtype (also a ValueError: a bad argument)."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_mixture_args(x, weight, bias, lora_a, lora_b, gates, scale, mode) -> None:
    """Validate shapes, dtypes and devices; raise ValueError naming the offending tensor."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has last dim {x.shape[-1]} but weight is (N={n}, K={k})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be (N,)=({n},), got {tuple(bias.shape)}")
    if lora_a.dim() != 3 or lora_a.shape[2] != k:
        raise ValueError(f"lora_a must be (E, r, K={k}), got {tuple(lora_a.shape)}")
    e, r, _ = lora_a.shape
    if tuple(lora_b.shape) != (e, n, r):
        raise ValueError(f"lora_b must be (E={e}, N={n}, r={r}), got {tuple(lora_b.shape)}")
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"number of experts E={e} outside the supported range 1..{MAX_EXPERTS}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r={r} outside the supported range 1..{MAX_RANK}")
    if gates.shape[-1] != e:
        raise ValueError(f"gates must end in E={e}, got shape {tuple(gates.shape)}")
    if tuple(gates.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(
            f"gates {tuple(gates.shape)} must have x's leading dims {tuple(x.shape[:-1])} + (E,)"
        )
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "gates": gates}
    if bias is not None:
        named["bias"] = bias
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    for name, t in named.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if lora_a.dtype != lora_b.dtype:
        raise ValueError(f"lora_a dtype {lora_a.dtype} differs from lora_b dtype {lora_b.dtype}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")


def resolve_backend(backend: str, device: torch.device, tensors: Mapping[str, torch.Tensor | None] | None = None,
                    op: str = "lora_mixture") -> str:
    """Map a backend request to the backend that will run, raising if it cannot be served.

    Args:
        backend: "auto", "torch" or "triton".
        device: the tensors' device.
        tensors: the op's tensors by name (None entries skipped): the Triton kernels compute in
            float16, bfloat16 and float32 only, so ``auto`` keeps any other dtype (float64) on torch
            and an explicit ``triton`` raises naming the tensor.
        op: the op's name, for the log line and the error message.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    unsupported = [(name, t.dtype) for name, t in (tensors or {}).items()
                   if t is not None and t.dtype not in TRITON_DTYPES]
    if backend == "auto":
        chosen = "triton" if device.type == "cuda" and not unsupported else "torch"
        key = f"{op}:{device.type}->{chosen}"
        if key not in _logged_auto:
            _logged_auto.add(key)
            why = f" ({unsupported[0][0]} is {unsupported[0][1]})" if device.type == "cuda" and unsupported else ""
            log.info("%s backend auto: %s tensors use the %s path%s", op, device.type, chosen, why)
        return chosen
    if backend == "triton":
        if unsupported:
            name, dtype = unsupported[0]
            raise UnsupportedDtypeError(
                f"{name} has dtype {dtype}, for which {op} has no Triton kernel (float16, bfloat16 and "
                "float32 are served); use backend='torch'"
            )
        if device.type != "cuda" and not triton_interpreting():
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing to run the kernels in Triton's CPU interpreter, or use backend='torch'"
            )
    return backend


def lora_mixture(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    mode: str = "output",
    backend: str = "auto",
) -> torch.Tensor:
    """Gated multi-LoRA-expert linear layer.

    Args:
        x: (..., K) input.
        weight: (N, K) frozen weight.
        bias: (N,) or None.
        lora_a: (E, r, K) stacked expert A matrices.
        lora_b: (E, N, r) stacked expert B matrices.
        gates: (..., E) one gate row per token, same leading dims as ``x``.
        scale: alpha / r.
        mode: "output" (sum of gated expert outputs) or "weight" (gated sums of A and B).
        backend: "torch", "triton" or "auto" (triton on CUDA, torch otherwise).
    Returns:
        (..., N) in x's dtype. Differentiable in x, lora_a, lora_b and gates.
    """
    check_mixture_args(x, weight, bias, lora_a, lora_b, gates, scale, mode)
    chosen = resolve_backend(backend, x.device, {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a,
                                                 "lora_b": lora_b, "gates": gates})
    if chosen == "triton":
        from .triton_lora import lora_mixture_triton  # imported lazily: needs a working triton

        return lora_mixture_triton(x, weight, bias, lora_a, lora_b, gates, float(scale), mode)
    return lora_mixture_torch(x, weight, bias, lora_a.to(x.dtype), lora_b.to(x.dtype),
                              gates.to(x.dtype), float(scale), mode)


def lora_single_expert(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert: int,
    gate: float,
    scale: float,
    mode: str = "output",
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`lora_mixture` for gates that are the same one-hot row ``gate * e_expert`` on every token.

    The result equals ``lora_mixture`` with those gates (no gate gradient). The torch path runs one
    plain LoRA (:class:`~modecotd_engine.kernels.reference.SingleExpertLoraFunction`); the Triton
    kernels already take a single-expert path per tile, so there the gates are built and passed on.
    """
    num_experts = lora_a.shape[0] if lora_a.dim() == 3 else 0
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
        raise ValueError(f"expert must be an int in 0..{num_experts - 1}, got {expert!r}")
    lead = x.shape[:-1]
    shape_only = x.new_zeros(num_experts).expand(*lead, num_experts)  # for the argument checks
    check_mixture_args(x, weight, bias, lora_a, lora_b, shape_only, scale, mode)
    chosen = resolve_backend(backend, x.device, {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a,
                                                 "lora_b": lora_b})
    if chosen == "triton":
        from .triton_lora import lora_mixture_triton

        gates = x.new_zeros(*lead, num_experts)
        gates[..., expert] = gate
        return lora_mixture_triton(x, weight, bias, lora_a, lora_b, gates, float(scale), mode)
    factor = float(scale) * float(gate) * (float(gate) if mode == "weight" else 1.0)
    return single_expert_lora_torch(x, weight, bias, lora_a, lora_b, expert, factor)
