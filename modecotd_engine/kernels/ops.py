"""Public entry point of the gated multi-LoRA-expert linear layer, with backend dispatch.

``backend="auto"`` takes the Triton kernels when the tensors live on a CUDA device and the torch
grouped path otherwise (the only path Triton can serve on CPU is its interpreter, which is for
tests). The choice is logged once. ``backend="triton_addmm"`` (``lora_mixture`` only) runs a second
design to measure against the fused one: the frozen GEMM in torch (cuBLAS) and the experts' expand
added into its output with ``addmm`` (``triton_addmm.py``); ``auto`` does not pick it. An explicit
request that cannot be served raises :class:`BackendUnavailableError`; nothing falls back silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from .args import MAX_EXPERTS, MAX_RANK, MODES, TRITON_DTYPES, check_mixture_args  # noqa: F401 - re-exported
from .reference import lora_mixture_torch, single_expert_lora_torch

log = logging.getLogger("modecotd_engine.kernels")

BACKENDS = ("auto", "torch", "triton")
# lora_mixture's backends: BACKENDS plus the second design, selected by name only
MIXTURE_BACKENDS = BACKENDS + ("triton_addmm",)
_logged_auto: set[str] = set()
# Attribute of lora_a holding ((versions, storages, dtype), A, B): the torch path's inference copies
_INFERENCE_COPIES = "_modecotd_inference_copies"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve these tensors."""


class UnsupportedDtypeError(BackendUnavailableError, ValueError):
    """The requested backend has no kernel for a tensor's dtype (also a ValueError: a bad argument)."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"



def resolve_backend(backend: str, device: torch.device, tensors: Mapping[str, torch.Tensor | None] | None = None,
                    op: str = "lora_mixture", backends: tuple[str, ...] = BACKENDS) -> str:
    """Map a backend request to the backend that will run, raising if it cannot be served.

    Args:
        backend: "auto", "torch" or "triton".
        device: the tensors' device.
        tensors: the op's tensors by name (None entries skipped): the Triton kernels compute in
            float16, bfloat16 and float32 only, so ``auto`` keeps any other dtype (float64) on torch
            and an explicit ``triton`` raises naming the tensor.
        op: the op's name, for the log line and the error message.
        backends: the names the op accepts (``triton_addmm``, checked like ``triton``, is
            ``lora_mixture``'s only).
    """
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
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
    if backend in ("triton", "triton_addmm"):
        if unsupported:
            name, dtype = unsupported[0]
            raise UnsupportedDtypeError(
                f"{name} has dtype {dtype}, for which {op} has no Triton kernel (float16, bfloat16 and "
                "float32 are served); use backend='torch'"
            )
        if device.type != "cuda" and not triton_interpreting():
            raise BackendUnavailableError(
                f"backend={backend!r} needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
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
        backend: "torch", "triton" or "auto" (triton on CUDA, torch otherwise); "triton_addmm"
            runs the second design (frozen GEMM by torch, expand by ``addmm``), served where
            "triton" is.
    Returns:
        (..., N) in x's dtype. Differentiable in x, lora_a, lora_b and gates.
    """
    # Validated once per call, here: the Triton forward adds only the kernels' own checks
    # (check_supported) and the backward trusts what the forward saved.
    check_mixture_args(x, weight, bias, lora_a, lora_b, gates, scale, mode)
    chosen = resolve_backend(backend, x.device, {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a,
                                                 "lora_b": lora_b, "gates": gates},
                             backends=MIXTURE_BACKENDS)
    if chosen == "triton_addmm":
        from .triton_addmm import lora_mixture_triton_addmm  # imported lazily: needs a working triton

        return lora_mixture_triton_addmm(x, weight, bias, lora_a, lora_b, gates, float(scale), mode)
    if chosen == "triton":
        from .triton_lora import lora_mixture_triton  # imported lazily: needs a working triton

        return lora_mixture_triton(x, weight, bias, lora_a, lora_b, gates, float(scale), mode)
    if torch.is_grad_enabled():
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    else:
        a, b = _inference_copies(lora_a, lora_b, x.dtype)
    return lora_mixture_torch(x, weight, bias, a, b, gates.to(x.dtype), float(scale), mode)


def _inference_copies(lora_a: torch.Tensor, lora_b: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in ``dtype`` for the torch path without autograd, made once while the bank's tensors
    keep their storage and version: decoding casts the float32 bank to bf16 in every layer at every
    step otherwise (measured: 3 copies of every layer's A and B per step, 4% of a decode step on
    SmolLM2-135M with 8 experts, 2-core CPU). B is laid out as B_cat (N, E*r) viewed as (E, N, r),
    so the path's ``cat_b`` is a view, not a copy. A training step (grad enabled) casts as before,
    through autograd."""
    key = (lora_a._version, lora_b._version, lora_a.data_ptr(), lora_b.data_ptr(), dtype)
    hit = getattr(lora_a, _INFERENCE_COPIES, None)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    a = lora_a.detach().to(dtype)
    b = lora_b.detach().to(dtype).permute(1, 0, 2).contiguous().permute(1, 0, 2)
    setattr(lora_a, _INFERENCE_COPIES, (key, a, b))  # freed with lora_a
    return a, b


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
    check_mixture_args(x, weight, bias, lora_a, lora_b, None, scale, mode)  # the gates are one number
    chosen = resolve_backend(backend, x.device, {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a,
                                                 "lora_b": lora_b})
    if chosen == "triton":
        from .triton_lora import lora_mixture_triton

        gates = x.new_zeros(*lead, num_experts)
        gates[..., expert] = gate
        return lora_mixture_triton(x, weight, bias, lora_a, lora_b, gates, float(scale), mode)
    factor = float(scale) * float(gate) * (float(gate) if mode == "weight" else 1.0)
    return single_expert_lora_torch(x, weight, bias, lora_a, lora_b, expert, factor)
