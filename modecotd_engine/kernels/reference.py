"""Plain-torch implementations of the gated multi-LoRA-expert linear layer.

One target linear layer: frozen ``W`` (N, K), optional bias ``b`` (N,), E experts with
``A_e`` (r, K) and ``B_e`` (N, r), scale ``s = alpha / r`` and a gate ``G`` (T, E), one row per token.

Output composition (``mode="output"``)::

    y_t = W x_t + b + s * sum_e G[t,e] * B_e A_e x_t

Weight composition (``mode="weight"``, LoraHub-style, what the MoDE-CoTD code does)::

    y_t = W x_t + b + s * (sum_e G[t,e] B_e) (sum_e G[t,e] A_e) x_t

Grouped form (``A_cat = [A_1; ...; A_E]`` is (E*r, K), ``B_cat = [B_1 ... B_E]`` is (N, E*r))::

    H   = X A_cat^T                                  (T, E*r), viewed (T, E, r)
    H~  = s * G[t,e] * H[t,e]                        output mode
    H~  = s * G[t,e] * u_t,  u_t = sum_e G[t,e] H[t,e]   weight mode
    Y   = X W^T + b + H~ B_cat^T

Backward (W frozen)::

    dH~ = dY B_cat                                   (T, E, r)
    output: dH[t,e] = s G[t,e] dH~[t,e];   dG[t,e] = s <dH~[t,e], H[t,e]>
    weight: du_t = s sum_e G[t,e] dH~[t,e];  dH[t,e] = G[t,e] du_t
            dG[t,e] = s <dH~[t,e], u_t> + <du_t, H[t,e]>
    dX     = dY W + dH A_cat
    dB_e   = dY^T H~_e           dA_e = dH_e^T X

Three implementations live here:

* :func:`lora_mixture_loop` -- the oracle: a slow, obviously-right loop over experts, differentiated
  by autograd. Tests compare every other path against it in float64.
* :class:`LoraMixtureTorchFunction` -- the grouped form above with the backward written out. It is
  the path taken on CPU. For ``mode="output"`` it never loops over experts in Python on dense
  gates; when every token has at most one nonzero gate (one-hot task gates while distilling) and
  no gate gradient is needed, it runs one small GEMM pair per *active* expert over that expert's
  rows only, so the LoRA work is that of a single LoRA whatever E is (the SGMV idea).
* :class:`SingleExpertLoraFunction` -- the special case of one expert with one gate value on every
  token (a one-task distillation batch), where the caller has read the gates once for all layers.
"""

from __future__ import annotations

import torch

from .args import MODES


def lora_mixture_loop(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    mode: str = "output",
) -> torch.Tensor:
    """Oracle: a per-expert Python loop, differentiated by autograd.

    Args:
        x: (..., K) input.
        weight: (N, K) frozen weight.
        bias: (N,) or None.
        lora_a: (E, r, K) stacked A matrices.
        lora_b: (E, N, r) stacked B matrices.
        gates: (..., E) one row per token (same leading dims as ``x``).
        scale: alpha / r.
        mode: "output" or "weight".
    Returns:
        (..., N)
    """
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    num_experts = lora_a.shape[0]
    if mode == "output":
        for e in range(num_experts):
            g = gates[..., e : e + 1]
            y = y + scale * g * ((x @ lora_a[e].t()) @ lora_b[e].t())
    elif mode == "weight":
        u = 0
        for e in range(num_experts):
            u = u + gates[..., e : e + 1] * (x @ lora_a[e].t())  # (..., r)
        for e in range(num_experts):
            y = y + scale * gates[..., e : e + 1] * (u @ lora_b[e].t())
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return y


def cat_b(lora_b: torch.Tensor) -> torch.Tensor:
    """(E, N, r) -> B_cat (N, E*r) with block e equal to B_e."""
    num_experts, n, r = lora_b.shape
    return lora_b.permute(1, 0, 2).reshape(n, num_experts * r)


def one_hot_rows(gates: torch.Tensor) -> bool:
    """True when every row of ``gates`` (T, E) has at most one nonzero entry."""
    return bool(((gates != 0).sum(-1) <= 1).all())


class LoraMixtureTorchFunction(torch.autograd.Function):
    """Grouped torch path with a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, gates, scale: float, mode: str):
        lead = x.shape[:-1]
        k = x.shape[-1]
        x2 = x.reshape(-1, k)  # (T, K)
        g2 = gates.reshape(-1, gates.shape[-1])  # (T, E)
        num_experts, r, _ = lora_a.shape
        plan = _sparse_plan(g2) if mode == "output" and not ctx.needs_input_grad[5] else None
        sparse = plan is not None
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        if sparse:
            for e, rows in plan:
                xe = x2 if rows is None else x2.index_select(0, rows)
                ge = g2[:, e] if rows is None else g2.index_select(0, rows)[:, e]
                ht = (xe @ lora_a[e].t()) * (scale * ge).unsqueeze(1)  # (n_e, r)
                if rows is None:
                    y.addmm_(ht, lora_b[e].t())
                else:
                    y.index_add_(0, rows, ht @ lora_b[e].t())
        else:
            h = (x2 @ lora_a.reshape(num_experts * r, k).t()).view(-1, num_experts, r)  # (T, E, r)
            ht = h_tilde(h, g2, scale, mode)
            y.addmm_(ht.reshape(-1, num_experts * r), cat_b(lora_b).t())
        ctx.save_for_backward(x2, weight, lora_a, lora_b, g2)
        ctx.scale, ctx.mode, ctx.sparse, ctx.has_bias = scale, mode, sparse, bias is not None
        ctx.plan = plan  # the backward reuses the rows of each active expert
        ctx.lead, ctx.gates_shape = lead, gates.shape
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, g2 = ctx.saved_tensors
        scale, mode = ctx.scale, ctx.mode
        num_experts, r, k = lora_a.shape
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        need_x, need_w, need_b, need_a, need_bb, need_g = ctx.needs_input_grad[:6]
        dx = dy2 @ weight if need_x else None
        dw = dy2.t() @ x2 if need_w else None
        dbias = dy2.sum(0) if (need_b and ctx.has_bias) else None
        da = torch.zeros_like(lora_a) if need_a else None
        db = torch.zeros_like(lora_b) if need_bb else None
        dg = None
        if ctx.sparse:
            for e, rows in ctx.plan:
                xe = x2 if rows is None else x2.index_select(0, rows)
                dye = dy2 if rows is None else dy2.index_select(0, rows)
                ge = (g2[:, e] if rows is None else g2.index_select(0, rows)[:, e]).unsqueeze(1)
                dht = dye @ lora_b[e]  # (n_e, r)
                dh = dht * (scale * ge)
                if need_x:
                    if rows is None:
                        dx.addmm_(dh, lora_a[e])
                    else:
                        dx.index_add_(0, rows, dh @ lora_a[e])
                if need_bb:
                    ht = (xe @ lora_a[e].t()) * (scale * ge)
                    db[e] = dye.t() @ ht
                if need_a:
                    da[e] = dh.t() @ xe
        else:
            h = (x2 @ lora_a.reshape(num_experts * r, k).t()).view(-1, num_experts, r)  # recompute
            dht = (dy2 @ cat_b(lora_b)).view(-1, num_experts, r)  # (T, E, r)
            if mode == "output":
                dh = dht * (scale * g2).unsqueeze(-1)
                if need_g:
                    dg = scale * (dht * h).sum(-1)
            else:
                u = (g2.unsqueeze(-1) * h).sum(1)  # (T, r)
                du = scale * (g2.unsqueeze(-1) * dht).sum(1)  # (T, r)
                dh = g2.unsqueeze(-1) * du.unsqueeze(1)
                if need_g:
                    dg = scale * (dht * u.unsqueeze(1)).sum(-1) + (h * du.unsqueeze(1)).sum(-1)
            if need_x:
                dx.addmm_(dh.reshape(-1, num_experts * r), lora_a.reshape(num_experts * r, k))
            if need_bb:
                ht = h_tilde(h, g2, scale, mode)
                db = torch.einsum("tn,ter->enr", dy2, ht)
            if need_a:
                da = torch.einsum("ter,tk->erk", dh, x2)
        if dx is not None:
            dx = dx.view(*ctx.lead, k)
        if dg is not None:
            dg = dg.view(ctx.gates_shape)
        return dx, dw, dbias, da, db, dg, None, None


def h_tilde(h: torch.Tensor, g2: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    """H~ from H (T, E, r) and G (T, E)."""
    if mode == "output":
        return h * (scale * g2).unsqueeze(-1)
    u = (g2.unsqueeze(-1) * h).sum(1, keepdim=True)  # (T, 1, r)
    return (scale * g2).unsqueeze(-1) * u


# NOTE: below this many rows (decoding), several small per-expert GEMMs with their gathers cost more
# than the dense grouped product: 64 rows, E=10, r=8, a q/v layer pair on a 2-core CPU took 1.40 ms
# per-expert vs 1.06 ms dense (the frozen layer alone: 0.63 ms). A single active expert is always
# one plain LoRA, so it takes the sparse path at any size.
SPARSE_MIN_ROWS = 256


def _sparse_plan(g2: torch.Tensor) -> list[tuple[int, torch.Tensor | None]] | None:
    """(expert, rows) for each expert with a nonzero gate, when the per-expert path pays; else None.

    It pays for one-hot rows (each row belongs to at most one expert) with either a single active
    expert or at least SPARSE_MIN_ROWS rows. ``rows`` is None when the expert has every row. The
    loop over the plan touches each expert's own rows only: total work is one LoRA's. The gate mask
    is read once here (one host sync) and the plan is reused by the backward.
    """
    if not one_hot_rows(g2):
        return None
    nz = g2 != 0  # (T, E)
    counts = nz.sum(0).tolist()
    active = [e for e, c in enumerate(counts) if c]
    if len(active) > 1 and g2.shape[0] < SPARSE_MIN_ROWS:
        return None
    t = g2.shape[0]
    return [(e, None if counts[e] == t else nz[:, e].nonzero().squeeze(1)) for e in active]


def lora_mixture_torch(x, weight, bias, lora_a, lora_b, gates, scale, mode="output"):
    """Grouped torch path (no argument checking; call :func:`modecotd_engine.kernels.lora_mixture`)."""
    return LoraMixtureTorchFunction.apply(x, weight, bias, lora_a, lora_b, gates, float(scale), mode)


class SingleExpertLoraFunction(torch.autograd.Function):
    """One expert for every token: ``y = x W^T + b + f * B_e A_e x`` with a scalar factor ``f``.

    The distillation loop's batches hold one task each, so every token's gate row is the same
    one-hot vector and the layer is a plain LoRA of expert ``e``. This path takes that case without
    the per-call gate analysis of :class:`LoraMixtureTorchFunction` (the plan is made once per batch
    by the caller): it converts only ``A_e`` and ``B_e`` to x's dtype, keeps ``H = f x A_e^T`` from the
    forward instead of recomputing it, and writes the gradient of the other experts as zeros.
    Forward, dX, dA and dB equal the grouped path's bit for bit on one-hot gates.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, expert: int, factor: float):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        a = lora_a[expert].to(x.dtype)  # (r, K)
        b = lora_b[expert].to(x.dtype)  # (N, r)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        h = (x2 @ a.t()).mul_(factor)  # (T, r)
        y.addmm_(h, b.t())
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.expert, ctx.factor, ctx.lead, ctx.has_bias = expert, factor, lead, bias is not None
        ctx.ab = (lora_a.shape, lora_a.dtype, lora_b.shape, lora_b.dtype)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, a, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dw = dbias = da = db = None
        dh = (dy2 @ b).mul_(ctx.factor) if (need_x or need_a) else None  # (T, r)
        if need_x:
            dx = (dy2 @ weight).addmm_(dh, a).view(*ctx.lead, x2.shape[1])
        if need_w:
            dw = dy2.t() @ x2
        if need_bias and ctx.has_bias:
            dbias = dy2.sum(0)
        a_shape, a_dtype, b_shape, b_dtype = ctx.ab
        if need_a:
            da = torch.zeros(a_shape, dtype=a_dtype, device=x2.device)
            da[ctx.expert] = dh.t() @ x2
        if need_b:
            db = torch.zeros(b_shape, dtype=b_dtype, device=x2.device)
            db[ctx.expert] = dy2.t() @ h
        return dx, dw, dbias, da, db, None, None


def single_expert_lora_torch(x, weight, bias, lora_a, lora_b, expert, factor):
    """Torch path of one expert on every token (no argument checking; see :func:`modecotd_engine.kernels.lora_single_expert`)."""
    return SingleExpertLoraFunction.apply(x, weight, bias, lora_a, lora_b, int(expert), float(factor))
