"""Routed multi-LoRA-expert linear layer: a learned per-token router computes the gates.

One target linear layer: frozen ``W`` (N, K), optional bias ``b``, E experts ``A_e`` (r, K),
``B_e`` (N, r), scale ``s``, and a router ``R`` (E, K). For each token ``x_t``::

    z_t = R x_t                                  router logits (E,)
    G_t = softmax(z_t)                           dense routing (top_k = 0)
    G_t = softmax(z_t restricted to its k largest entries), 0 elsewhere      (top_k = k)
    y_t = lora_mixture(x_t; G_t)                 output or weight composition (see reference.py)

Grouped form: the router is treated as E more rows of the experts' down projection. Its E rows are
appended to ``A_cat``, so ONE shrink GEMM against ``[A_cat; R]`` (E*r + E, K) yields both ``H``
(T, E*r) and the logits ``Z`` (T, E), and X is read once for both::

    [H | Z] = X [A_cat; R]^T
    G       = softmax / top-k of Z               (the epilogue)
    H~      = s G[t,e] H[t,e]                    output mode
    H~      = s G[t,e] u_t, u_t = sum_e G[t,e] H[t,e]     weight mode
    Y       = X W^T + b + H~ B_cat^T

Backward (W frozen). ``dG`` is the gate gradient of the plain mixture (reference.py), then the
softmax Jacobian; with top-k, ``G`` is zero outside the kept set, so the same formula gives zero
gradient to the dropped logits (top-k selection is piecewise constant)::

    dH~ = dY B_cat                               (T, E, r)
    output: dH[t,e] = s G[t,e] dH~[t,e];  dG[t,e] = s <dH~[t,e], H[t,e]>
    weight: du_t = s sum_e G[t,e] dH~[t,e];  dH[t,e] = G[t,e] du_t
            dG[t,e] = s <dH~[t,e], u_t> + <du_t, H[t,e]>
    dZ[t,e] = G[t,e] (dG[t,e] - sum_j G[t,j] dG[t,j])
    dX          = dY W + [dH | dZ] [A_cat; R]    ONE GEMM for the LoRA and router parts
    [dA_cat; dR] = [dH | dZ]^T X                 ONE GEMM for both weight gradients
    dB_e        = dY^T H~_e

Two implementations live here:

* :func:`routed_lora_mixture_reference` -- router logits, softmax/top-k written plainly, then the
  per-expert loop oracle :func:`~modecotd_engine.kernels.reference.lora_mixture_loop`; autograd
  differentiates it. Tests compare against it in float64.
* :class:`RoutedLoraMixtureFunction` -- the grouped form above with the backward written out, the
  path :func:`routed_lora_mixture` takes for ``backend="torch"`` (any device).

The fused Triton kernels of the same math live in :mod:`~modecotd_engine.kernels.triton_router`
(router shrink with the softmax/top-k epilogue), with the fused GEMM of triton_fused_gemm.py and the
backward kernels of triton_lora.py.
``backend="triton"`` takes them: it needs CUDA tensors (or ``TRITON_INTERPRET=1``, Triton's CPU
interpreter, for tests) in float16, bfloat16 or float32, and raises BackendUnavailableError
otherwise. ``backend="auto"`` takes Triton for CUDA tensors of those dtypes and the grouped torch
path otherwise (CPU, or float64 anywhere); the choice is logged once per device and path.
"""

from __future__ import annotations

import torch

from .args import MODES, check_mixture_args, check_router_args
from .ops import resolve_backend
from .reference import cat_b, h_tilde, lora_mixture_loop


def _gates_from_logits(z: torch.Tensor, top_k: int) -> torch.Tensor:
    """Routing gates from router logits, softmax in at least fp32 (bf16 logits lose the small gates).

    Args:
        z: (T, E) logits.
        top_k: 0 for dense softmax, else keep the k largest logits per row and renormalize.
    Returns:
        (T, E) gates in z's dtype; rows sum to 1.
    """
    zf = z if z.dtype == torch.float64 else z.float()
    if 0 < top_k < z.shape[-1]:
        keep = torch.zeros_like(zf, dtype=torch.bool).scatter_(-1, zf.topk(top_k, dim=-1).indices, True)
        zf = zf.masked_fill(~keep, float("-inf"))
    return torch.softmax(zf, dim=-1).to(z.dtype)


def routing_gates(x: torch.Tensor, router: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """The gates a router gives each token (no gradient bookkeeping of its own; autograd-safe).

    Args:
        x: (..., K) input.
        router: (E, K).
        top_k: 0 (dense) or 1..E.
    Returns:
        (..., E) gates; each row sums to 1.
    """
    z = x @ router.to(x.dtype).t()
    return _gates_from_logits(z.reshape(-1, z.shape[-1]), top_k).view(z.shape)


def routed_lora_mixture_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor,
    scale: float,
    top_k: int = 0,
    mode: str = "output",
) -> torch.Tensor:
    """Oracle: logits, then softmax over the top-k written with topk + scatter, then the expert loop.

    Args: as :func:`routed_lora_mixture` (no backend). Differentiable by autograd in every input.
    """
    z = x @ router.t()  # (..., E)
    if 0 < top_k < router.shape[0]:
        vals, idx = z.topk(top_k, dim=-1)
        gates = torch.zeros_like(z).scatter(-1, idx, torch.softmax(vals, dim=-1))
    else:
        gates = torch.softmax(z, dim=-1)
    return lora_mixture_loop(x, weight, bias, lora_a, lora_b, gates, scale, mode)


class RoutedLoraMixtureFunction(torch.autograd.Function):
    """Grouped routed mixture: one shrink GEMM against ``[A_cat; R]`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router, scale: float, top_k: int, mode: str):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (T, K)
        num_experts, r, _ = lora_a.shape
        er = num_experts * r
        a_r = torch.cat([lora_a.reshape(er, k), router])  # (E*r + E, K): router rows after A_cat
        hz = x2 @ a_r.t()  # (T, E*r + E): H and the router logits from one GEMM
        h = hz[:, :er].view(-1, num_experts, r)  # (T, E, r)
        g = _gates_from_logits(hz[:, er:], top_k)  # (T, E)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(h_tilde(h, g, scale, mode).reshape(-1, er), cat_b(lora_b).t())
        # H is recomputed in backward (one GEMM) rather than kept: (T, E*r) per layer adds up over a model.
        ctx.save_for_backward(x2, weight, lora_a, lora_b, router, g)
        ctx.scale, ctx.mode, ctx.has_bias, ctx.lead = scale, mode, bias is not None, lead
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, router, g = ctx.saved_tensors
        scale, mode = ctx.scale, ctx.mode
        num_experts, r, k = lora_a.shape
        er = num_experts * r
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        need_x, need_w, need_b, need_a, need_bb, need_r = ctx.needs_input_grad[:6]
        a_r = torch.cat([lora_a.reshape(er, k), router])  # (E*r + E, K)
        h = (x2 @ a_r[:er].t()).view(-1, num_experts, r)  # recompute H (T, E, r)
        dht = (dy2 @ cat_b(lora_b)).view(-1, num_experts, r)  # (T, E, r)
        gu = g.unsqueeze(-1)
        if mode == "output":
            dh = dht * (scale * gu)
            dg = scale * (dht * h).sum(-1)
        else:
            u = (gu * h).sum(1)  # (T, r)
            du = scale * (gu * dht).sum(1)  # (T, r)
            dh = gu * du.unsqueeze(1)
            dg = scale * (dht * u.unsqueeze(1)).sum(-1) + (h * du.unsqueeze(1)).sum(-1)
        # softmax backward; zero gates (dropped by top-k) give zero logit gradient.
        dz = g * (dg - (g * dg).sum(-1, keepdim=True))  # (T, E)
        dhz = torch.cat([dh.reshape(-1, er), dz], dim=1)  # (T, E*r + E)
        dx = dw = dbias = da = db = drouter = None
        if need_x:
            dx = torch.addmm(dy2 @ weight, dhz, a_r).view(*ctx.lead, k)  # LoRA + router in one GEMM
        if need_w:
            dw = dy2.t() @ x2
        if need_b and ctx.has_bias:
            dbias = dy2.sum(0)
        if need_a or need_r:
            d_ar = dhz.t() @ x2  # (E*r + E, K): dA_cat and dR in one GEMM
            if need_a:
                da = d_ar[:er].view(num_experts, r, k)
            if need_r:
                drouter = d_ar[er:]
        if need_bb:
            db = torch.einsum("tn,ter->enr", dy2, h_tilde(h, g, scale, mode))
        return dx, dw, dbias, da, db, drouter, None, None, None



def routed_lora_mixture(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor,
    scale: float,
    top_k: int = 0,
    mode: str = "output",
    backend: str = "auto",
) -> torch.Tensor:
    """Gated multi-LoRA-expert linear layer whose per-token gates come from a learned router.

    Args:
        x: (..., K) input.
        weight: (N, K) frozen weight.
        bias: (N,) or None.
        lora_a: (E, r, K) stacked expert A matrices.
        lora_b: (E, N, r) stacked expert B matrices.
        router: (E, K) router; logits = x router^T.
        scale: alpha / r.
        top_k: 0 for dense softmax gates; k in 1..E keeps the k largest logits per token and
            renormalizes (top_k = E is dense).
        mode: "output" or "weight" composition.
        backend: "torch" (the grouped torch path, any device and float dtype), "triton" (the fused
            kernels of triton_router.py: CUDA tensors, or TRITON_INTERPRET=1, in fp16/bf16/fp32;
            BackendUnavailableError otherwise) or "auto" (triton for CUDA tensors of those dtypes,
            torch otherwise; logged once).
    Returns:
        (..., N) in x's dtype. Differentiable in x, lora_a, lora_b and router; each gradient comes
        back in its input's dtype.
    """
    # Validated once here: the Triton path's forward adds only the kernels' own checks and its
    # backward none (the torch path's Function checks nothing).
    if lora_a.dim() == 3 and x.dim() >= 1:
        check_mixture_args(x, weight, bias, lora_a, lora_b, None, scale, mode)  # no gate tensor here
    check_router_args(router, lora_a, x, top_k)
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "router": router}
    if resolve_backend(backend, x.device, tensors, op="the routed mixture") == "triton":
        from .triton_router import routed_lora_mixture_triton  # imported lazily: needs a working triton

        # the kernels cast the expert and router weights to x's dtype themselves and return each
        # gradient in its input's dtype (fp32 experts next to bf16 activations)
        return routed_lora_mixture_triton(x, weight, bias, lora_a, lora_b, router, float(scale), int(top_k),
                                          mode)
    dt = x.dtype
    return RoutedLoraMixtureFunction.apply(x, weight, bias, lora_a.to(dt), lora_b.to(dt), router.to(dt),
                                           float(scale), int(top_k), mode)


__all__ = [
    "MODES",
    "RoutedLoraMixtureFunction",
    "check_router_args",
    "routed_lora_mixture",
    "routed_lora_mixture_reference",
    "routing_gates",
]
