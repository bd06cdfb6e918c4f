"""Fused Triton kernels of the ROUTED multi-LoRA-expert linear layer (a learned per-token router).

One target linear layer: frozen ``W`` (N, K), optional bias ``b`` (N,), E experts ``A_e`` (r, K) and
``B_e`` (N, r), scale ``s``, router ``R`` (E, K). ``A_cat = [A_1; ...; A_E]`` (E*r, K),
``B_cat = [B_1 ... B_E]`` (N, E*r). The router's E rows are appended to ``A_cat``, so one pass over X
yields the experts' H and the router logits Z (the grouped form of router.py).

Forward (two launches)::

    [H | Z] = X [A_cat; R]^T                       ONE pass over K (``_router_shrink_kernel``)
    G       = softmax(Z)                           top_k = 0 (or E): dense
    G       = softmax(Z over the k largest logits of the row), 0 elsewhere       0 < top_k < E
    output mode:  H~[t,e] = s G[t,e] H[t,e]
    weight mode:  P[t,e]  = G[t,e] H[t,e]  (fp32); the expand forms u_t = sum_e P[t,e] and s G[t,e] u_t
    Y = [X | H~] [W | B_cat]^T + b                 the fused GEMM of triton_fused_gemm.py, unchanged

The gates are computed in fp32 from the fp32 logit accumulator and saved (T, E) for the backward;
X, the weights and G are all that is saved (H is recomputed, as in triton_lora.py).

Backward (W frozen)::

    dH~ = dY B_cat                                 (T, E, r)
    output: dH[t,e] = s G[t,e] dH~[t,e];  dG[t,e] = s <dH~[t,e], H[t,e]>
    weight: du_t = s sum_e G[t,e] dH~[t,e];  dH[t,e] = G[t,e] du_t
            dG[t,e] = s <dH~[t,e], u_t> + <du_t, H[t,e]>
    dZ[t,e] = G[t,e] (dG[t,e] - sum_j G[t,j] dG[t,j])        softmax Jacobian; top-k: 0 off the kept set
    dX            = dY W + [dH | dZ] [A_cat; R]    ONE launch of the fused GEMM
    [dA_cat; dR]  = [dH | dZ]^T X                  ONE launch of the token-reduce kernel
    dB_e          = dY^T H~_e                      token-reduce kernel
    dW = dY^T X, db = sum_t dY[t]                  only when W / b require grad (plain torch)

Launches of the backward: the backward shrink of triton_lora.py (dH~ and the recomputed H turned into
dH, H~ and dG; weight mode adds its combine kernel), ``_router_softmax_bwd_kernel`` (dZ), then the fused
GEMM (dX) and the token reduction twice (dA and dR together, dB). dZ needs every expert's dG of a row
while the backward shrink's programs each hold one group of experts, so the softmax Jacobian is its
own small (T, E) pass rather than an epilogue.

The router as extra experts. The fused GEMM and the token reduction of triton_lora.py work on blocks
of r columns, one per expert, masked by the gates. The router part is laid out the same way: its E
logit columns are padded to ``n_r = ceil(E / r)`` blocks of r columns ("router blocks"), so
``[dH | dZ | 0]`` is (T, (E + n_r) r) and ``[A_cat; R; 0]`` is ((E + n_r) r, K). The gate tensor the
forward writes is (T, E + n_r): G, then 1.0 in the router blocks' columns, which makes those kernels
read every router block (they read a LoRA block only where its gate is nonzero; that is exact here
because dH and dZ both vanish where G does). ``[A_cat; R; 0]`` is assembled in the backward (a copy
of the expert and router weights, (E r + E) x K elements).

Top-k. The kernel keeps k entries per row by taking the row maximum k times; among exactly equal
logits the lowest expert index is kept (torch.topk does not specify an order for ties). Top-k makes
G piecewise constant in Z, so the dropped logits get zero gradient, as in the torch path.

Precision: inputs fp16, bf16 or fp32; every product accumulated in fp32; the router and expert weights
may be fp32 next to 16-bit activations (cast to x's dtype right before ``tl.dot``, as the torch path
casts them) and each gradient comes back in its input's own dtype. The logits stay in fp32 from the
accumulator to the softmax, so the gates do not see the 16-bit rounding of Z that the torch path's
(T, E) logits tensor has.

No K split for decode-sized batches (triton_lora.py splits the forward shrink's K for T <= 64): the
softmax needs each row's complete logits inside one program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .args import check_router_args
from .triton_configs import (bucketed, for_bucket, keep_fitting, plain, shrink_configs, small_tiles_for_ieee,
                             smem_limit, tile_bytes)
from .triton_fused_gemm import launch_fused_gemm
from .triton_lora import launch_bwd_shrink, launch_token_reduce, launch_weight_combine
from .triton_utils import (
    INTERPRET,
    SUPPORTED_DTYPES,
    T_BUCKETS,
    alloc,
    check_supported,
    make_plan,
    next_pow2,
    rows_contiguous,
)

# NOTE: tuning constants. Not yet timed on a GPU. The router shrink takes the forward shrink's config
# table (triton_configs.py; same loop structure, plus a Z_PAD <= 64 wide second accumulator); configs
# whose two fp32 accumulators would need more than _MAX_ACC_REGS registers per thread are dropped
# (tile arithmetic: BLOCK_M * (EPT*BLOCK_R + Z_PAD) / (32 * num_warps)), like the backward shrink's
# BLOCK_M <= 64 rule for its two accumulators. Checked by compiling ahead of time for sm_90 and
# sm_80 with Triton 3.9 (no GPU needed): every config the prune picks for E in {4, 8, 10, 32, 64},
# r in {1, 8, 16, 64, 128}, T in {1, 64, 256, 4096}, K in {576, 2048}, bf16/fp16/fp32 and both
# modes (236 kernels) compiles, and its shared memory stays within the device's (227 / 163 KiB);
# so does triton_lora.py's fused GEMM at E_PAD=128, which the backward's router blocks can reach.
_MAX_ACC_REGS = 128
# Rows per program of the (T, E) softmax-backward pass: a memory-bound elementwise pass over at most
# 64 + 64 columns, so one small tile without tuning.
_SOFTMAX_BWD_BLOCK_M = 32
# The router logits are padded to a power of two >= 16 (tl.dot's minimum tile width on GPUs).
_MIN_Z_PAD = 16


# ----------------------------------------------------------------------------------------------
# Autotune configs, pruned by shape
# ----------------------------------------------------------------------------------------------


def router_shrink_configs(interpret: bool = INTERPRET):
    """The forward shrink's table, plus two small-footprint configs tried only when none of it fits
    (``interpret``: the interpreter's one config, as in triton_configs.py).

    The router columns widen the right-hand tile by up to 64: fp32 decode with E=64, r=16 has 192
    columns, and the shrink table's smallest decode config (16x128, 4 stages) then needs
    4 * (16*128 + 128*192) * 4 B = 416 KiB by the estimate below (Triton allocates stages - 1 of
    them: 312 KiB), over any GPU's shared memory. 2 stages of 64-deep K steps fit every case:
    2 * (64*64 + 64*192) * 4 B = 128 KiB for fp32.
    """
    configs = shrink_configs(interpret)
    if interpret:
        return configs
    spare = bucketed({b: [(16, 64, 4, 2), (64, 64, 4, 2)] for b in (*T_BUCKETS, 4096)},
                     ("BLOCK_M", "BLOCK_K"))
    for c in spare:
        c.spare = True
    return configs + spare


def _prune_router_shrink(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    x = named_args["x_ptr"]
    factor = max(named_args["a_ptr"], named_args["rt_ptr"], key=lambda t: t.element_size())
    cols = kwargs["EPT"] * kwargs["BLOCK_R"] + kwargs["Z_PAD"]
    limit = smem_limit()

    def smem(c):
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        return c.num_stages * (tile_bytes(bm, bk, x) + tile_bytes(bk, cols, factor))

    def pick(cand):
        cand = for_bucket(cand, named_args["T_BUCKET"])
        cand = [c for c in cand if c.kwargs["BLOCK_K"] <= max(32, next_pow2(named_args["K"]))] or cand
        cand = [c for c in cand
                if c.kwargs["BLOCK_M"] * cols <= _MAX_ACC_REGS * 32 * c.num_warps] or cand
        return small_tiles_for_ieee(cand, kwargs["PREC"], lambda c: c.kwargs["BLOCK_M"] * cols, 64 * 128)

    main = pick([c for c in configs if not getattr(c, "spare", False)])
    if any(smem(c) <= limit for c in main):
        return plain(keep_fitting(main, smem, limit))
    return plain(keep_fitting(pick([c for c in configs if getattr(c, "spare", False)]), smem, limit))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=router_shrink_configs(),
    key=["T_BUCKET", "K", "E", "R", "OUTPUT_MODE", "PREC"],
    prune_configs_by={"early_config_prune": _prune_router_shrink},
    cache_results=True,
)
@triton.jit
def _router_shrink_kernel(
    x_ptr,  # (T, K) activations
    a_ptr,  # (E, R, K) stacked A
    rt_ptr,  # (E, K) router
    h_ptr,  # (T, E*R) out: H~ = s*G*H (output mode, x dtype) or P = G*H (weight mode, fp32)
    g_ptr,  # (T, n_gate_cols) out, fp32: G in columns 0..E-1, then 1.0 (the router blocks' mask)
    stride_x_t, stride_x_k,  # x strides
    stride_a_e, stride_a_r, stride_a_k,  # lora_a strides
    stride_rt_e, stride_rt_k,  # router strides
    stride_h_t,  # row stride of h (expert block stride R, rank stride 1)
    stride_g_t, stride_g_e,  # gate-buffer strides
    T, K, E, R,  # sizes
    n_gate_cols,  # columns of the gate buffer: E + number of router blocks (<= 2E)
    scale,  # s = alpha / r
    T_BUCKET,  # token-count bucket; autotune key only
    OUTPUT_MODE: tl.constexpr,  # True: H~ = s*G*H; False: P = G*H
    TOP_K: tl.constexpr,  # 0: dense softmax; 0 < k < E: softmax over the k largest logits
    PREC: tl.constexpr,  # tl.dot input precision for fp32 inputs
    BLOCK_R: tl.constexpr,  # padded rank (pow2 >= 16)
    EPT: tl.constexpr,  # experts per program (pow2)
    Z_PAD: tl.constexpr,  # pow2 >= E, >= 16: router-logit columns
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # reduction step
):
    pid = tl.program_id(0).to(tl.int64)
    n_groups = tl.cdiv(E, EPT)
    # expert groups vary fastest: programs sharing a row tile of X run together (L2)
    grp = pid % n_groups
    pid_m = pid // n_groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    offs_c = tl.arange(0, EPT * BLOCK_R)
    ce = grp * EPT + offs_c // BLOCK_R  # (EPT*BLOCK_R,) expert of each H column
    cj = offs_c % BLOCK_R  # rank index of each H column
    c_ok = (ce < E) & (cj < R)
    offs_z = tl.arange(0, Z_PAD)
    z_ok = offs_z < E
    offs_k = tl.arange(0, BLOCK_K)

    # One pass over K feeds both accumulators from the same X tile. Every program of a row tile
    # recomputes the (BLOCK_M, E) logits: Z_PAD <= 64 columns next to EPT*BLOCK_R, and it spares a
    # second launch and a round trip of Z through memory before the softmax.
    x_ptrs = x_ptr + rows[:, None] * stride_x_t + offs_k[None, :] * stride_x_k
    a_ptrs = a_ptr + (ce.to(tl.int64) * stride_a_e + cj * stride_a_r)[None, :] + offs_k[:, None] * stride_a_k
    r_ptrs = rt_ptr + offs_z[None, :] * stride_rt_e + offs_k[:, None] * stride_rt_k
    acc_h = tl.zeros((BLOCK_M, EPT * BLOCK_R), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_M, Z_PAD), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        rt = tl.load(r_ptrs, mask=k_ok[:, None] & z_ok[None, :], other=0.0)
        # fp32 experts/router next to 16-bit activations: the dots run in the activations' dtype
        acc_h = tl.dot(xt, at.to(xt.dtype), acc_h, input_precision=PREC)
        acc_z = tl.dot(xt, rt.to(xt.dtype), acc_z, input_precision=PREC)
        x_ptrs += BLOCK_K * stride_x_k
        a_ptrs += BLOCK_K * stride_a_k
        r_ptrs += BLOCK_K * stride_rt_k

    # epilogue 1: gates from the fp32 logits; padding columns are -inf, so exp gives them 0
    z = tl.where(z_ok[None, :], acc_z, float("-inf"))
    if TOP_K > 0:
        keep = tl.zeros((BLOCK_M, Z_PAD), dtype=tl.int1)
        rest = z
        for _ in range(TOP_K):
            top = tl.max(rest, axis=1)
            # exact ties: the lowest expert index among the maxima is kept, one entry per step
            first = tl.min(tl.where(rest == top[:, None], offs_z[None, :], Z_PAD), axis=1)
            hit = offs_z[None, :] == first[:, None]
            keep = keep | hit
            rest = tl.where(hit, float("-inf"), rest)
        z = tl.where(keep, z, float("-inf"))
    z_max = tl.max(z, axis=1)
    p = tl.exp(z - z_max[:, None])
    g = p / tl.sum(p, axis=1)[:, None]  # (BLOCK_M, Z_PAD) fp32, rows sum to 1
    if grp == 0:
        tl.store(g_ptr + rows[:, None] * stride_g_t + offs_z[None, :] * stride_g_e, g,
                 mask=row_ok[:, None] & z_ok[None, :])
        # the router blocks' mask columns (at most E of them, so Z_PAD covers them)
        ones = tl.full((BLOCK_M, Z_PAD), 1.0, dtype=tl.float32)
        tl.store(g_ptr + rows[:, None] * stride_g_t + (E + offs_z)[None, :] * stride_g_e, ones,
                 mask=row_ok[:, None] & (offs_z < n_gate_cols - E)[None, :])

    # epilogue 2: each H column times its expert's gate. A register gather by expert index does not
    # exist in Triton; a masked row sum per expert of the group is exact (a one-hot tl.dot would
    # round the gates to TF32 on GPUs).
    coef = tl.zeros((BLOCK_M, EPT * BLOCK_R), dtype=tl.float32)
    for i in tl.static_range(EPT):
        g_i = tl.sum(tl.where(offs_z[None, :] == grp * EPT + i, g, 0.0), axis=1)  # (BLOCK_M,)
        coef = tl.where(((offs_c // BLOCK_R) == i)[None, :], g_i[:, None], coef)
    if OUTPUT_MODE:
        coef = coef * scale
    tl.store(h_ptr + rows[:, None] * stride_h_t + (ce * R + cj)[None, :],
             (acc_h * coef).to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _router_softmax_bwd_kernel(
    g_ptr,  # (T, >= E) gates, fp32 (the forward's gate buffer)
    dg_ptr,  # (T, E) gate gradient dG, fp32
    dz_ptr,  # (T, W) out: dZ in columns 0..E-1, zeros in E..W-1 (the router blocks' padding)
    stride_g_t, stride_g_e,  # gate strides
    stride_dg_t, stride_dg_e,  # dG strides
    stride_dz_t,  # row stride of dz (column stride 1)
    T, E, W,  # sizes: tokens, experts, columns of dz to write
    BLOCK_M: tl.constexpr,  # rows per program
    W_PAD: tl.constexpr,  # pow2 >= W (>= E)
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    offs = tl.arange(0, W_PAD)
    e_ok = offs < E
    g = tl.load(g_ptr + rows[:, None] * stride_g_t + offs[None, :] * stride_g_e,
                mask=row_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    # dG is not needed where G == 0 (top-k drops): dZ = G * (...) vanishes there anyway
    dg = tl.load(dg_ptr + rows[:, None] * stride_dg_t + offs[None, :] * stride_dg_e,
                 mask=row_ok[:, None] & e_ok[None, :] & (g != 0.0), other=0.0).to(tl.float32)
    mean_dg = tl.sum(g * dg, axis=1)  # (BLOCK_M,) the gate-weighted mean of dG
    dz = g * (dg - mean_dg[:, None])
    tl.store(dz_ptr + rows[:, None] * stride_dz_t + offs[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs < W)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterGradNeeds:
    """Which gradients the routed backward launcher must produce."""

    x: bool = True
    lora_a: bool = True
    lora_b: bool = True
    router: bool = True


def router_blocks(num_experts: int, rank: int) -> int:
    """Number of r-column blocks that hold the E router columns in the backward's augmented layout."""
    return triton.cdiv(num_experts, rank)


def _check_routed(x, weight, bias, lora_a, lora_b, router, top_k, mode, *, router_args: bool = True) -> None:
    """What these kernels require: 2-D x, the plain mixture's kernel checks (``check_supported``), the
    router checks of every backend (``check_router_args``, left out with ``router_args=False`` where the
    public entry point :func:`~modecotd_engine.kernels.router.routed_lora_mixture` already ran them),
    then the router's dtype and the experts' limit."""
    if x.dim() != 2:
        raise ValueError("triton launchers take 2-D x (T, K); flatten leading dims first")
    # the plain mixture's checks without a gate tensor: this op computes its gates itself
    check_supported(x, weight, bias, lora_a, lora_b, None, mode)
    if router_args:
        check_router_args(router, lora_a, x, top_k)
    num_experts = lora_a.shape[0]
    if router.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton backend: router has dtype {router.dtype}; supported are float16, "
                         "bfloat16 and float32 (use backend='torch' for other dtypes)")
    if INTERPRET and router.dtype == torch.bfloat16:
        raise ValueError("triton backend: router is bfloat16, which Triton's CPU interpreter cannot "
                         "compute (TRITON_INTERPRET=1); use float16/float32 there or run on CUDA")
    if num_experts > 64:
        raise ValueError(f"the routed Triton kernels take at most 64 experts, got E={num_experts}")


def routed_lora_mixture_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor,
    scale: float,
    top_k: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the routed multi-LoRA layer in two launches (router shrink, fused GEMM).

    Args:
        x: (T, K) activations, fp16/bf16/fp32.
        weight: (N, K) frozen weight, x's dtype.
        bias: (N,) in x's dtype, or None.
        lora_a: (E, r, K) stacked A (any supported dtype; cast to x's dtype in the kernel).
        lora_b: (E, N, r) stacked B (lora_a's dtype).
        router: (E, K) router (any supported dtype), E <= 64.
        scale: alpha / r.
        top_k: 0 for dense softmax gates, else 1..E.
        mode: "output" or "weight".
    Returns:
        y (T, N) in x's dtype, and the gate buffer (T, E + ceil(E / r)) fp32: the gates G in its first
        E columns, 1.0 in the rest (what :func:`routed_lora_mixture_bwd` takes).
    """
    _check_routed(x, weight, bias, lora_a, lora_b, router, top_k, mode)
    return _routed_fwd(x, weight, bias, lora_a, lora_b, router, scale, top_k, mode)


def _routed_fwd(x, weight, bias, lora_a, lora_b, router, scale, top_k, mode):
    """:func:`routed_lora_mixture_fwd` on inputs already checked."""
    x = rows_contiguous(x)
    t_len, k_len = x.shape
    n_len = weight.shape[0]
    num_experts, rank, _ = lora_a.shape
    n_gate_cols = num_experts + router_blocks(num_experts, rank)
    out = alloc((t_len, n_len), dtype=x.dtype, device=x.device)
    gates = alloc((t_len, n_gate_cols), dtype=torch.float32, device=x.device)
    if t_len == 0:
        return out, gates
    plan = make_plan(t_len, num_experts, rank, x.dtype)
    weight_mode = mode == "weight"
    # weight mode's P = G*H stays fp32 until the expand sums it over experts (as in triton_lora.py)
    hbuf = alloc((t_len, num_experts * rank), device=x.device,
                 dtype=torch.float32 if weight_mode else x.dtype)
    n_groups = triton.cdiv(num_experts, plan.ept)
    _router_shrink_kernel[lambda meta: (triton.cdiv(t_len, meta["BLOCK_M"]) * n_groups,)](
        x, lora_a, router, hbuf, gates,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        router.stride(0), router.stride(1),
        hbuf.stride(0),
        gates.stride(0), gates.stride(1),
        t_len, k_len, num_experts, rank, n_gate_cols, scale, plan.t_bucket,
        OUTPUT_MODE=not weight_mode, TOP_K=top_k if 0 < top_k < num_experts else 0,
        PREC=plan.prec, BLOCK_R=plan.block_r, EPT=plan.ept,
        Z_PAD=max(_MIN_Z_PAD, next_pow2(num_experts)),
    )
    if n_len > 0:
        launch_fused_gemm(
            left=x, right=weight, right_strides=(weight.stride(1), weight.stride(0)),
            lowrank=hbuf, factor=lora_b,
            factor_strides=(lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
            gates=gates[:, :num_experts], bias=bias, out=out, scale=scale, weight_mode=weight_mode,
            plan=plan,
        )
    return out, gates


def _augmented_factor(lora_a: torch.Tensor, router: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[A_cat; R; 0] as (E + n_blocks, r, K): the router rows padded to whole rank blocks."""
    num_experts, rank, k_len = lora_a.shape
    dtype = lora_a.dtype if router.dtype == lora_a.dtype else torch.float32
    aug = torch.empty(((num_experts + n_blocks) * rank, k_len), dtype=dtype, device=lora_a.device)
    aug[: num_experts * rank] = lora_a.reshape(num_experts * rank, k_len)
    aug[num_experts * rank : num_experts * rank + num_experts] = router
    aug[num_experts * rank + num_experts :] = 0  # rows the zero dZ padding meets: must be finite
    return aug.view(num_experts + n_blocks, rank, k_len)


def routed_lora_mixture_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    mode: str,
    needs: RouterGradNeeds = RouterGradNeeds(),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of the routed multi-LoRA layer (W frozen): dX, dA, dB, dR.

    Args:
        dy: (T, N) gradient of the output.
        x: (T, K) saved activations.
        weight: (N, K) frozen weight.
        lora_a: (E, r, K); lora_b: (E, N, r); router: (E, K).
        gates: (T, E + ceil(E / r)) fp32 gate buffer from :func:`routed_lora_mixture_fwd`.
        scale: alpha / r.
        mode: "output" or "weight".
        needs: which of dX, dA, dB, dR to produce; the others come back as None.
    Returns:
        (dx (T, K) in x's dtype, da (E, r, K) in lora_a's dtype, db (E, N, r) in lora_b's dtype,
        dr (E, K) in router's dtype), None where not needed.

    This launcher checks its inputs; the autograd Function's backward skips the checks (its forward
    checked the tensors it saved and made the gate buffer).
    """
    num_experts, rank, _ = lora_a.shape
    n_blocks = router_blocks(num_experts, rank)
    _check_routed(x, weight, None, lora_a, lora_b, router, 0, mode)
    t_len, n_len = x.shape[0], weight.shape[0]
    if tuple(dy.shape) != (t_len, n_len):
        raise ValueError(f"dy must be (T, N)=({t_len}, {n_len}), got {tuple(dy.shape)}")
    if tuple(gates.shape) != (t_len, num_experts + n_blocks) or gates.dtype != torch.float32:
        raise ValueError(f"gates must be the forward's (T, E + ceil(E/r))=({t_len}, {num_experts + n_blocks}) "
                         f"float32 buffer, got {tuple(gates.shape)} {gates.dtype}")
    return _routed_bwd(dy, x, weight, lora_a, lora_b, router, gates, scale, mode, needs)


def _routed_bwd(dy, x, weight, lora_a, lora_b, router, gates, scale, mode, needs):
    """:func:`routed_lora_mixture_bwd` on inputs already checked (the autograd Function's backward)."""
    num_experts, rank, _ = lora_a.shape
    n_blocks = router_blocks(num_experts, rank)
    x = rows_contiguous(x)
    dy = rows_contiguous(dy.to(x.dtype))
    t_len, k_len = x.shape
    dev = x.device
    er = num_experts * rank
    e_aug = num_experts + n_blocks  # experts plus router blocks
    g = gates[:, :num_experts]  # (T, E) view
    dx = alloc((t_len, k_len), dtype=x.dtype, device=dev) if needs.x else None
    db = alloc(lora_b.shape, dtype=lora_b.dtype, device=dev) if needs.lora_b else None
    da = dr = None
    if t_len == 0:
        zeros = lambda t: torch.zeros_like(t)  # noqa: E731
        return (dx, zeros(lora_a) if needs.lora_a else None, db.zero_() if db is not None else None,
                zeros(router) if needs.router else None)
    plan = make_plan(t_len, num_experts, rank, x.dtype)
    weight_mode = mode == "weight"
    need_dg = needs.x or needs.router  # dZ feeds dX and dR
    need_dh = needs.x or needs.lora_a  # dH feeds dX and dA
    need_ht = needs.lora_b  # H~ feeds dB

    # [dH | dZ | 0] (T, e_aug * r) in x's dtype; H~ gets the same row stride because the backward
    # shrink (and the weight-mode combine) write dH and H~ with one row stride.
    dhz = alloc((t_len, e_aug * rank), dtype=x.dtype, device=dev) if (need_dh or need_dg) else None
    dh = dhz[:, :er] if need_dh else None
    ht = alloc((t_len, e_aug * rank), dtype=x.dtype, device=dev)[:, :er] if need_ht else None
    dg = alloc((t_len, num_experts), dtype=torch.float32, device=dev) if need_dg else None

    # 1. dH~ = dY B_cat and the recomputed H, turned into dH, H~ and dG. dG must cover every expert
    #    of every row (compute_all): the backward shrink writes dG only on its grouped path.
    if need_dh or need_ht or need_dg:
        if weight_mode:
            has_dht = need_dh or need_dg
            has_h = need_ht or need_dg
            raw_dht = alloc((t_len, er), dtype=torch.float32, device=dev) if has_dht else None
            raw_h = alloc((t_len, er), dtype=torch.float32, device=dev) if has_h else None
            launch_bwd_shrink(dy, x, lora_a, lora_b, g, raw_dht, raw_h, None, scale, plan,
                              weight_mode=True, compute_all=need_dg)
            launch_weight_combine(raw_dht, raw_h, g, dh, ht, dg, scale, plan)
        else:
            launch_bwd_shrink(dy, x, lora_a, lora_b, g, dh, ht, dg, scale, plan,
                              weight_mode=False, compute_all=need_dg)

    # 2. dZ = G (dG - sum_j G_j dG_j) into the router blocks of [dH | dZ | 0], padding zeroed
    if need_dg:
        width = n_blocks * rank
        _router_softmax_bwd_kernel[(triton.cdiv(t_len, _SOFTMAX_BWD_BLOCK_M),)](
            gates, dg, dhz[:, er:],
            gates.stride(0), gates.stride(1),
            dg.stride(0), dg.stride(1),
            dhz.stride(0),
            t_len, num_experts, width,
            BLOCK_M=_SOFTMAX_BWD_BLOCK_M, W_PAD=next_pow2(width),
        )

    # 3. dX = dY W + [dH | dZ] [A_cat; R]: one fused GEMM, the router blocks as extra experts
    if needs.x and k_len > 0:
        factor = _augmented_factor(lora_a, router, n_blocks)
        launch_fused_gemm(
            left=dy, right=weight, right_strides=(weight.stride(0), weight.stride(1)),
            lowrank=dhz, factor=factor,
            factor_strides=(factor.stride(0), factor.stride(1), factor.stride(2)),
            gates=gates, bias=None, out=dx, scale=1.0, weight_mode=False,
            plan=make_plan(t_len, e_aug, rank, x.dtype),
        )

    # 4. [dA_cat; dR] = [dH | dZ]^T X: one token reduction over the needed blocks (experts, router)
    if needs.lora_a or needs.router:
        lo = 0 if needs.lora_a else num_experts
        hi = e_aug if needs.router else num_experts
        if needs.lora_a and needs.router:
            dtype = lora_a.dtype if router.dtype == lora_a.dtype else torch.float32
        else:
            dtype = lora_a.dtype if needs.lora_a else router.dtype
        d_aug = alloc((hi - lo, rank, k_len), dtype=dtype, device=dev)
        launch_token_reduce(big=x, small=dhz[:, lo * rank : hi * rank], gates=gates[:, lo:hi], out=d_aug,
                            out_strides=(d_aug.stride(0), d_aug.stride(2), d_aug.stride(1)),
                            plan=make_plan(t_len, hi - lo, rank, x.dtype))
        if needs.lora_a:
            da = d_aug[:num_experts].to(lora_a.dtype)
        if needs.router:
            dr = d_aug[num_experts - lo :].reshape(n_blocks * rank, k_len)[:num_experts].to(router.dtype)

    # 5. dB_e = dY^T H~_e
    if needs.lora_b:
        launch_token_reduce(big=dy, small=ht, gates=g, out=db,
                            out_strides=(db.stride(0), db.stride(1), db.stride(2)), plan=plan)
    return dx, da, db, dr


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class RoutedLoraMixtureTriton(torch.autograd.Function):
    """Triton forward/backward of the routed multi-LoRA layer (see the module docstring).

    Saves x (as (T, K)), the frozen weight, the stacked experts, the router and the fp32 gate
    buffer (T, E + ceil(E/r)); H is recomputed in backward. dW and db (only when weight / bias
    require grad) are a plain torch matmul and sum.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router, scale: float, top_k: int, mode: str):
        lead, k_len = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(math.prod(lead), k_len)  # (T, K); explicit T: K may be 0
        # the kernels' own checks; the router checks of every backend ran at the public entry point
        # (router.routed_lora_mixture), and the backward trusts what this forward checked and saved
        _check_routed(x2, weight, bias, lora_a, lora_b, router, top_k, mode, router_args=False)
        y2, gates = _routed_fwd(x2, weight, bias, lora_a, lora_b, router, scale, top_k, mode)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, router, gates)
        ctx.scale, ctx.mode = scale, mode
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.lead = lead
        return y2.view(*lead, y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, router, gates = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_r = ctx.needs_input_grad[:6]
        dy2 = dy.reshape(x2.shape[0], weight.shape[0])  # (T, N); explicit T: N may be 0
        dx = da = db = dr = None
        if need_x or need_a or need_b or need_r:
            needs = RouterGradNeeds(x=need_x, lora_a=need_a, lora_b=need_b, router=need_r)
            dx, da, db, dr = _routed_bwd(dy2, x2, weight, lora_a, lora_b, router, gates, ctx.scale, ctx.mode,
                                         needs)
        dw = (dy2.t().to(x2.dtype) @ x2).to(weight.dtype) if need_w else None
        dbias = None
        if need_bias and ctx.has_bias:
            dbias = dy2.float().sum(0).to(ctx.bias_dtype)
        if dx is not None:
            dx = dx.view(*ctx.lead, x2.shape[-1])
        return dx, dw, dbias, da, db, dr, None, None, None


def routed_lora_mixture_triton(
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
    """Routed multi-LoRA layer on the Triton kernels (validation of shapes and of the router is the
    caller's: :func:`modecotd_engine.kernels.router.routed_lora_mixture`; the forward adds the kernels'
    own checks, the backward none).

    Args:
        x: (..., K) activations, fp16/bf16/fp32.
        weight: (N, K) frozen weight in x's dtype; bias: (N,) in x's dtype, or None.
        lora_a: (E, r, K); lora_b: (E, N, r), one dtype; router: (E, K), E <= 64. fp32 experts and
            router next to 16-bit activations are fine; each gradient comes back in its input's dtype.
        scale: alpha / r.
        top_k: 0 for dense softmax gates; k in 1..E keeps the k largest logits per token.
        mode: "output" or "weight".
    Returns:
        (..., N) in x's dtype. Differentiable in x, lora_a, lora_b and router (and weight, bias).
    """
    return RoutedLoraMixtureTriton.apply(x, weight, bias, lora_a, lora_b, router, float(scale), int(top_k), mode)


# The autotuned kernel of this file, for reports of the configs picked per shape (``Autotuner.cache``).
AUTOTUNED_KERNELS = {"router_shrink": _router_shrink_kernel}
