"""A second design of the gated multi-LoRA-expert layer, to measure against the fused GEMM:
``backend="triton_addmm"``.

The frozen GEMM is a plain ``F.linear`` / ``torch.mm`` (cuBLAS on a GPU) and the experts' expand is
added into its output with ``addmm_`` over the concatenated rank axis (vLLM's LoRA layout)::

    forward:   Y  = X W^T + b                      (F.linear)
               H~ = the shrink kernel's output     (T, E*r): s G H (output mode); in weight mode the
                    shrink writes P = G H and H~[t,e] = s G[t,e] u_t, u_t = sum_e P[t,e] (torch)
               Y += H~ B_cat^T                     (addmm_, B_cat^T (E*r, N))
    backward:  dX = dY W + dH A_cat                (torch.mm, then addmm_, A_cat (E*r, K))
               dH, H~, dG, dA, dB                  as the fused design (``triton_lora.py``): the
                                                   backward shrink, the weight-mode combine and the
                                                   token-reduce kernels

The Triton kernels are the fused design's (shrink, backward shrink, weight combine, token reduce);
only the frozen GEMM and the expand differ. The expand is dense: it multiplies every expert's
block, zero where a gate is zero (the low-rank buffers it reads are zero-filled), so one-hot gates
pay E experts' expand instead of one; the frozen GEMM is cuBLAS's. Which design wins depends on the
shape and the gates; ``modecotd_engine.bench.kernels`` times both (providers ``triton`` and
``triton_addmm``), and ``backend="auto"`` keeps the fused design until a GPU run decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_lora import function_backward, function_forward, launch_shrink
from .triton_utils import alloc, check_supported, make_plan, rows_contiguous


def expand_operand(hbuf: torch.Tensor, gates: torch.Tensor, scale: float, weight_mode: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """(T, E*r) H~ in ``dtype`` from the shrink's zero-filled (S, T, E*r) buffer: K-split partials
    summed in fp32; in weight mode ``H~[t,e] = s G[t,e] u_t`` with ``u_t = sum_e P[t,e]`` (fp32, then
    rounded, as the fused kernel does)."""
    h = hbuf[0] if hbuf.shape[0] == 1 else hbuf.sum(0)
    if not weight_mode:
        return h.to(dtype)
    t_len, num_experts = gates.shape
    u = h.view(t_len, num_experts, -1).sum(1)  # (T, r) fp32
    ht = u[:, None, :] * (scale * gates.float())[:, :, None]  # (T, E, r)
    return ht.to(dtype).reshape(t_len, -1)


def lora_mixture_fwd_addmm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    mode: str,
) -> torch.Tensor:
    """Forward: ``F.linear`` for the frozen GEMM, the shrink kernel, then ``addmm_`` of the expand.

    Same arguments and result as :func:`~modecotd_engine.kernels.triton_lora.lora_mixture_fwd`.
    """
    check_supported(x, weight, bias, lora_a, lora_b, gates, mode)
    x = rows_contiguous(x)
    t_len = x.shape[0]
    n_len = weight.shape[0]
    num_experts, rank, _ = lora_a.shape
    if t_len == 0 or n_len == 0:
        return alloc((t_len, n_len), dtype=x.dtype, device=x.device)
    out = F.linear(x, weight, bias)
    plan = make_plan(t_len, num_experts, rank, x.dtype)
    weight_mode = mode == "weight"
    hbuf = launch_shrink(x, lora_a, gates, scale, plan, weight_mode=weight_mode, zero_fill=True)
    ht = expand_operand(hbuf, gates, scale, weight_mode, x.dtype)
    b_cat_t = lora_b.permute(0, 2, 1).reshape(num_experts * rank, n_len).to(x.dtype)  # (E*r, N)
    return out.addmm_(ht, b_cat_t)


class LoraMixtureTritonAddmmFunction(torch.autograd.Function):
    """Forward/backward of the ``triton_addmm`` design (module docstring); saves what the fused
    design's Function saves (x, W, A, B, G) and recomputes H in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, gates, scale: float, mode: str):
        return function_forward(ctx, lora_mixture_fwd_addmm, x, weight, bias, lora_a, lora_b, gates,
                                scale, mode)

    @staticmethod
    def backward(ctx, dy):
        return function_backward(ctx, dy, expand="addmm")


lora_mixture_triton_addmm = LoraMixtureTritonAddmmFunction.apply
