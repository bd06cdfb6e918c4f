"""What the gated multi-LoRA-expert ops accept, checked the same way by every backend.

Torch only (no Triton import), so the dispatch (``ops.py``, ``router.py``) and the Triton launchers
(``triton_utils.py``, ``triton_router.py``) share one definition of the modes, the limits and the
argument checks without importing each other.
"""

from __future__ import annotations

import torch

# "output": sum of gated expert outputs; "weight": gated sums of A and B (see reference.py).
MODES = ("output", "weight")
MAX_EXPERTS = 64
MAX_RANK = 128
# What the Triton kernels compute in; other dtypes (float64) stay on the torch path.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_mixture_args(x, weight, bias, lora_a, lora_b, gates, scale, mode) -> None:
    """Validate shapes, dtypes and devices; raise ValueError naming the offending tensor.

    ``gates`` None: the op has no gate tensor to check (the routed op computes its gates; a single
    expert's are one number), so no stand-in tensor is made for it on every call.
    """
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
    if gates is not None and gates.shape[-1] != e:
        raise ValueError(f"gates must end in E={e}, got shape {tuple(gates.shape)}")
    if gates is not None and tuple(gates.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(
            f"gates {tuple(gates.shape)} must have x's leading dims {tuple(x.shape[:-1])} + (E,)"
        )
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if gates is not None:
        named["gates"] = gates
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


def check_router_args(router: torch.Tensor, lora_a: torch.Tensor, x: torch.Tensor, top_k: int) -> None:
    """Validate the router against the experts and the input; raise ValueError naming the tensor."""
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a must be (E, r, K), got {tuple(lora_a.shape)}")
    e, _, k = lora_a.shape
    if router.dim() != 2 or tuple(router.shape) != (e, k):
        raise ValueError(f"router must be (E={e}, K={k}), got {tuple(router.shape)}")
    if not router.is_floating_point():
        raise ValueError(f"router must be a floating-point tensor, got {router.dtype}")
    if router.device != x.device:
        raise ValueError(f"router is on {router.device} but x is on {x.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= e:
        raise ValueError(f"top_k must be an int in 0..E={e} (0 = dense softmax), got {top_k!r}")
