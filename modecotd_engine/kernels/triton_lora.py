"""Fused Triton kernels of the gated multi-LoRA-expert linear layer.

One target linear layer: frozen ``W`` (N, K), optional bias ``b`` (N,), E experts ``A_e`` (r, K) and
``B_e`` (N, r), scale ``s``, gates ``G`` (T, E). ``A_cat = [A_1; ...; A_E]`` is (E*r, K) and
``B_cat = [B_1 ... B_E]`` is (N, E*r); ``H[t,e] = A_e x_t`` is the (T, E, r) shrink output.

Forward (two launches)::

    output mode:  H~[t,e] = s G[t,e] H[t,e]
    weight mode:  u_t = sum_e G[t,e] H[t,e],   H~[t,e] = s G[t,e] u_t
    Y = [X | H~] [W | B_cat]^T + b            (one GEMM over the concatenated reduction axis)

1. ``_lora_shrink_kernel`` writes ``H~`` (output mode) or ``P[t,e] = G[t,e] H[t,e]`` (weight mode, fp32;
   the expand step sums ``u = sum_e P_e`` and scales ``s G[t,e] u`` per expert block on the fly).
2. ``_lora_fused_gemm_kernel`` (``triton_fused_gemm.py``, shared with the routed op) accumulates
   ``X W^T`` and then the active experts' ``H~_e B_e^T`` into one fp32 tile, adds the bias and writes
   Y once.

Backward (``dH~ = dY B_cat``; W frozen)::

    output mode:  dH[t,e] = s G[t,e] dH~[t,e]
                  dG[t,e] = s <dH~[t,e], H[t,e]>
    weight mode:  du_t    = s sum_e G[t,e] dH~[t,e]
                  dH[t,e] = G[t,e] du_t
                  dG[t,e] = s <dH~[t,e], u_t> + <du_t, H[t,e]>
    dX   = [dY | dH] [W ; A_cat]                (the fused GEMM kernel again, with W read untransposed)
    dA_e = dH_e^T X          (E, r, K)
    dB_e = dY^T H~_e         (E, N, r)
    dW   = dY^T X,  db = sum_t dY[t]   only when W / b require grad: plain torch matmul and sum,
                                        outside the kernels (W is frozen in this engine)

``_lora_bwd_shrink_kernel`` computes ``dH~`` and recomputes ``H`` for one tile of rows and experts and
emits dH, H~ and dG from registers (output mode); in weight mode it writes the raw dH~ and H and
``_lora_weight_combine_kernel`` forms u, du, dH, H~ and dG. ``_lora_token_reduce_kernel`` does the two
reductions over tokens (dA, dB). Only X and G (and the frozen/expert weights) are saved for backward;
H is recomputed, which costs one (T, K, E*r) GEMM.

Sparsity: a tile of rows in which expert e has no nonzero gate skips expert e everywhere (shrink,
expand, dH~/H, dX, dA, dB) -- unless dG is needed, because dG[t,e] is nonzero even where G[t,e] = 0.
A row tile with exactly one active expert (one-hot task gates, rows grouped by expert) takes a
single-expert path, so its LoRA work is one LoRA's whatever E is. Consumers read the low-rank
buffers only where ``G[t,e] != 0``, so the producers never write blocks that nobody reads.

Precision: inputs fp16, bf16 or fp32, every product accumulated in fp32. LoRA weights and gates may
have a dtype other than x (fp32 experts with bf16 activations): they are cast to x's dtype in the
kernel right before ``tl.dot``, and each gradient comes back in its input's own dtype. fp32 inputs use
IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set, matching torch's matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_configs import (
    bwd_shrink_configs,
    prune_bwd_shrink,
    prune_reduce,
    prune_shrink,
    reduce_configs,
    shrink_configs,
)
from .triton_fused_gemm import AUTOTUNED_KERNELS as FUSED_GEMM_KERNELS
from .triton_fused_gemm import launch_fused_gemm
from .triton_utils import INTERPRET, alloc, check_supported, make_plan, rows_contiguous, t_bucket

# NOTE: the autotune tables and the evidence for them are in triton_configs.py.
# Forward shrink split-K granule for decode-sized batches (T <= 64): K=4096 -> 4 splits of 1024,
# K=2048 -> 4 of 512, K=1024 -> 2, K=576 -> 1. The interpreter's is smaller so that the tests'
# K=70..100 exercise splits.
_SPLIT_GRAIN = 16 if INTERPRET else 256


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _project(
    in_ptr,  # (T, D) row-major-ish input: X or dY
    stride_in_t,  # row stride of the input
    stride_in_d,  # reduction-axis stride of the input
    rows,  # (BLOCK_M,) int64 row indices
    row_ok,  # (BLOCK_M,) rows < T
    d_lo,  # first reduction index of this program (split-K), usually 0
    d_hi,  # one past the last reduction index (K or N, or the end of the split)
    lr_ptr,  # base of the low-rank factor (A or B, possibly already offset to one expert)
    col_off,  # (BLOCK_N,) int64 offset of each output column's vector in the factor
    col_ok,  # (BLOCK_N,) columns to load (others contribute zeros)
    stride_lr_d,  # reduction-axis stride of the factor
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc[m, c] = sum_{d_lo <= d < d_hi} In[rows[m], d] * F[col_off[c] + d * stride_lr_d] in fp32."""
    offs_d = tl.arange(0, BLOCK_D)
    in_ptrs = in_ptr + rows[:, None] * stride_in_t + (d_lo + offs_d)[None, :] * stride_in_d
    lr_ptrs = lr_ptr + col_off[None, :] + (d_lo + offs_d)[:, None] * stride_lr_d  # (BLOCK_D, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d in range(d_lo, d_hi, BLOCK_D):
        d_ok = offs_d < d_hi - d
        a = tl.load(in_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        f = tl.load(lr_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        # Expert weights may be fp32 next to bf16 activations: the dot runs in the input's dtype.
        acc = tl.dot(a, f.to(a.dtype), acc, input_precision=PREC)
        in_ptrs += BLOCK_D * stride_in_d
        lr_ptrs += BLOCK_D * stride_lr_d
    return acc


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=shrink_configs(),
    key=["T_BUCKET", "K", "E", "R", "OUTPUT_MODE", "PREC"],
    prune_configs_by={"early_config_prune": prune_shrink},
    cache_results=True,
)
@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # (T, K) activations
    a_ptr,  # (E, R, K) stacked A
    g_ptr,  # (T, E) gates
    h_ptr,  # (S, T, E*R) out: H~ (output mode) or P = G*H (weight mode), one slab per K split
    stride_x_t, stride_x_k,  # x strides
    stride_a_e, stride_a_r, stride_a_k,  # lora_a strides
    stride_g_t, stride_g_e,  # gate strides
    stride_h_s, stride_h_t,  # split and row strides of h (expert block stride R, rank stride 1)
    T, K, E, R,  # sizes
    n_split,  # S: number of K splits (1 outside decode-sized batches)
    k_per_split,  # reduction length per split (K when S == 1)
    scale,  # s = alpha / r
    T_BUCKET,  # token-count bucket; autotune key only
    OUTPUT_MODE: tl.constexpr,  # True: H~ = s*G*H; False: P = G*H
    PREC: tl.constexpr,  # tl.dot input precision for fp32 inputs
    BLOCK_R: tl.constexpr,  # padded rank (pow2 >= 16)
    EPT: tl.constexpr,  # experts per program (pow2)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # reduction step
):
    pid = tl.program_id(0).to(tl.int64)
    n_groups = tl.cdiv(E, EPT)
    # experts vary fastest, then K splits: programs sharing a row tile of X run together (L2)
    grp = pid % n_groups
    split = (pid // n_groups) % n_split
    pid_m = pid // (n_groups * n_split)
    # i32 loop bounds, like every other K loop here (K < 2**31; the pointers themselves are i64)
    k_lo = (split * k_per_split).to(tl.int32)
    k_hi = tl.minimum(K, k_lo + k_per_split)
    h_ptr += split * stride_h_s
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    offs_g = tl.arange(0, EPT * BLOCK_R)
    ce = grp * EPT + offs_g // BLOCK_R  # (EPT*BLOCK_R,) expert of each column
    cj = offs_g % BLOCK_R  # rank index of each column
    c_ok = (ce < E) & (cj < R)
    g2 = tl.load(g_ptr + rows[:, None] * stride_g_t + ce[None, :] * stride_g_e,
                 mask=row_ok[:, None] & (ce < E)[None, :], other=0.0).to(tl.float32)
    c_act = tl.max((g2 != 0.0).to(tl.int32), axis=0)  # (EPT*BLOCK_R,) expert has a nonzero gate
    n_act = tl.sum(c_act, axis=0) // BLOCK_R  # active experts in this tile
    if n_act == 1:
        # one active expert (one-hot gates): a (BLOCK_M, BLOCK_R) GEMM, the cost of a single LoRA
        e1 = tl.max(tl.where(c_act > 0, ce, 0), axis=0)
        offs_j = tl.arange(0, BLOCK_R)
        j_ok = offs_j < R
        acc1 = _project(x_ptr, stride_x_t, stride_x_k, rows, row_ok, k_lo, k_hi,
                        a_ptr + e1 * stride_a_e, offs_j.to(tl.int64) * stride_a_r, j_ok, stride_a_k,
                        BLOCK_M, BLOCK_K, BLOCK_R, PREC)
        g1 = tl.load(g_ptr + rows * stride_g_t + e1 * stride_g_e, mask=row_ok, other=0.0).to(tl.float32)
        coef1 = g1 * scale if OUTPUT_MODE else g1
        tl.store(h_ptr + rows[:, None] * stride_h_t + (e1 * R + offs_j)[None, :],
                 (acc1 * coef1[:, None]).to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & j_ok[None, :])
    elif n_act > 1:
        # several experts: one GEMM over their concatenated rank columns; inactive ones load nothing
        col_off = ce.to(tl.int64) * stride_a_e + cj * stride_a_r
        acc = _project(x_ptr, stride_x_t, stride_x_k, rows, row_ok, k_lo, k_hi,
                       a_ptr, col_off, c_ok & (c_act > 0), stride_a_k,
                       BLOCK_M, BLOCK_K, EPT * BLOCK_R, PREC)
        coef = g2 * scale if OUTPUT_MODE else g2
        tl.store(h_ptr + rows[:, None] * stride_h_t + (ce * R + cj)[None, :],
                 (acc * coef).to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & c_ok[None, :])


@triton.autotune(
    configs=bwd_shrink_configs(),
    key=["T_BUCKET", "N", "K", "E", "R", "WEIGHT_MODE", "COMPUTE_ALL", "DH_OUT", "H_OUT", "DG_OUT", "PREC"],
    prune_configs_by={"early_config_prune": prune_bwd_shrink},
    cache_results=True,
)
@triton.jit
def _lora_bwd_shrink_kernel(
    dy_ptr,  # (T, N) output gradient
    x_ptr,  # (T, K) activations
    a_ptr,  # (E, R, K) stacked A
    b_ptr,  # (E, N, R) stacked B
    g_ptr,  # (T, E) gates
    dh_ptr,  # (T, E*R) out: dH = s*G*dH~ (output mode, x dtype) or raw dH~ (weight mode, fp32)
    ht_ptr,  # (T, E*R) out: H~ = s*G*H (output mode, x dtype) or raw H (weight mode, fp32)
    dg_ptr,  # (T, E) out: dG (output mode with DG_OUT)
    stride_dy_t, stride_dy_n,  # dy strides
    stride_x_t, stride_x_k,  # x strides
    stride_a_e, stride_a_r, stride_a_k,  # lora_a strides
    stride_b_e, stride_b_n, stride_b_r,  # lora_b strides
    stride_g_t, stride_g_e,  # gate strides
    stride_buf_t,  # row stride of dh / ht (expert block stride R, rank stride 1)
    stride_dg_t, stride_dg_e,  # dG strides
    T, N, K, E, R,  # sizes
    scale,  # s
    T_BUCKET,  # token-count bucket; autotune key only
    WEIGHT_MODE: tl.constexpr,  # write raw dH~ and H for the weight-mode combine kernel
    COMPUTE_ALL: tl.constexpr,  # dG needed: no expert may be skipped
    DH_OUT: tl.constexpr,  # write dh_ptr
    H_OUT: tl.constexpr,  # write ht_ptr
    DG_OUT: tl.constexpr,  # write dg_ptr (output mode)
    NEED_DHT: tl.constexpr,  # compute dH~ (DH_OUT or dG needed)
    NEED_H: tl.constexpr,  # recompute H (H_OUT or dG needed)
    PREC: tl.constexpr,  # tl.dot input precision for fp32 inputs
    BLOCK_R: tl.constexpr,  # padded rank (pow2 >= 16)
    EPT: tl.constexpr,  # experts per program (pow2)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # reduction step over N and K
):
    pid = tl.program_id(0).to(tl.int64)
    n_groups = tl.cdiv(E, EPT)
    pid_m = pid // n_groups
    grp = pid % n_groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    offs_g = tl.arange(0, EPT * BLOCK_R)
    ce = grp * EPT + offs_g // BLOCK_R
    cj = offs_g % BLOCK_R
    c_ok = (ce < E) & (cj < R)
    g2 = tl.load(g_ptr + rows[:, None] * stride_g_t + ce[None, :] * stride_g_e,
                 mask=row_ok[:, None] & (ce < E)[None, :], other=0.0).to(tl.float32)
    c_act = tl.max((g2 != 0.0).to(tl.int32), axis=0)
    n_act = tl.sum(c_act, axis=0) // BLOCK_R
    if COMPUTE_ALL:
        n_act = n_act + 2  # every expert of the tile goes through the grouped path
    if n_act == 1:
        e1 = tl.max(tl.where(c_act > 0, ce, 0), axis=0)
        offs_j = tl.arange(0, BLOCK_R)
        j_ok = offs_j < R
        g1 = tl.load(g_ptr + rows * stride_g_t + e1 * stride_g_e, mask=row_ok, other=0.0).to(tl.float32)
        coef1 = g1 * scale
        out_off = rows[:, None] * stride_buf_t + (e1 * R + offs_j)[None, :]
        out_mask = row_ok[:, None] & j_ok[None, :]
        if DH_OUT:
            dht1 = _project(dy_ptr, stride_dy_t, stride_dy_n, rows, row_ok, 0, N,
                            b_ptr + e1 * stride_b_e, offs_j.to(tl.int64) * stride_b_r, j_ok, stride_b_n,
                            BLOCK_M, BLOCK_D, BLOCK_R, PREC)
            if not WEIGHT_MODE:
                dht1 = dht1 * coef1[:, None]
            tl.store(dh_ptr + out_off, dht1.to(dh_ptr.dtype.element_ty), mask=out_mask)
        if H_OUT:
            h1 = _project(x_ptr, stride_x_t, stride_x_k, rows, row_ok, 0, K,
                          a_ptr + e1 * stride_a_e, offs_j.to(tl.int64) * stride_a_r, j_ok, stride_a_k,
                          BLOCK_M, BLOCK_D, BLOCK_R, PREC)
            if not WEIGHT_MODE:
                h1 = h1 * coef1[:, None]
            tl.store(ht_ptr + out_off, h1.to(ht_ptr.dtype.element_ty), mask=out_mask)
    elif n_act > 1:
        load_ok = c_ok if COMPUTE_ALL else c_ok & (c_act > 0)
        ce64 = ce.to(tl.int64)
        out_off = rows[:, None] * stride_buf_t + (ce * R + cj)[None, :]
        out_mask = row_ok[:, None] & c_ok[None, :]
        coef = g2 * scale
        if NEED_DHT:
            dht = _project(dy_ptr, stride_dy_t, stride_dy_n, rows, row_ok, 0, N,
                           b_ptr, ce64 * stride_b_e + cj * stride_b_r, load_ok, stride_b_n,
                           BLOCK_M, BLOCK_D, EPT * BLOCK_R, PREC)
        if NEED_H:
            h = _project(x_ptr, stride_x_t, stride_x_k, rows, row_ok, 0, K,
                         a_ptr, ce64 * stride_a_e + cj * stride_a_r, load_ok, stride_a_k,
                         BLOCK_M, BLOCK_D, EPT * BLOCK_R, PREC)
        if WEIGHT_MODE:
            if DH_OUT:
                tl.store(dh_ptr + out_off, dht.to(dh_ptr.dtype.element_ty), mask=out_mask)
            if H_OUT:
                tl.store(ht_ptr + out_off, h.to(ht_ptr.dtype.element_ty), mask=out_mask)
        else:
            if DH_OUT:
                tl.store(dh_ptr + out_off, (dht * coef).to(dh_ptr.dtype.element_ty), mask=out_mask)
            if H_OUT:
                tl.store(ht_ptr + out_off, (h * coef).to(ht_ptr.dtype.element_ty), mask=out_mask)
            if DG_OUT:
                # dG[t,e] = s <dH~[t,e], H[t,e]>: a segmented row sum over each expert's columns
                prod = dht * h
                for i in tl.static_range(EPT):
                    sel = (offs_g // BLOCK_R) == i
                    dg = scale * tl.sum(tl.where(sel[None, :], prod, 0.0), axis=1)
                    e_i = tl.zeros_like(rows) + (grp * EPT + i)  # (BLOCK_M,) expert index
                    tl.store(dg_ptr + rows * stride_dg_t + e_i * stride_dg_e,
                             dg.to(dg_ptr.dtype.element_ty), mask=row_ok & (e_i < E))


@triton.jit
def _lora_weight_combine_kernel(
    dht_ptr,  # (T, E*R) raw dH~ (fp32), read when HAS_DHT
    h_ptr,  # (T, E*R) raw H (fp32), read when HAS_H
    g_ptr,  # (T, E) gates
    dh_ptr,  # (T, E*R) out: dH = G*du
    ht_ptr,  # (T, E*R) out: H~ = s*G*u
    dg_ptr,  # (T, E) out: dG
    stride_raw_t,  # row stride of the raw buffers
    stride_buf_t,  # row stride of dh / ht
    stride_g_t, stride_g_e,  # gate strides
    stride_dg_t, stride_dg_e,  # dG strides
    T, E, R,  # sizes
    scale,  # s
    HAS_DHT: tl.constexpr,  # raw dH~ available
    HAS_H: tl.constexpr,  # raw H available
    DH_OUT: tl.constexpr,  # write dh_ptr
    HT_OUT: tl.constexpr,  # write ht_ptr
    DG_OUT: tl.constexpr,  # write dg_ptr (raw buffers then hold every expert)
    BLOCK_R: tl.constexpr,  # padded rank
    BLOCK_M: tl.constexpr,  # rows per program
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    offs_j = tl.arange(0, BLOCK_R)
    j_ok = offs_j < R
    full = row_ok[:, None] & j_ok[None, :]
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for e in range(0, E):
        g = tl.load(g_ptr + rows * stride_g_t + e * stride_g_e, mask=row_ok, other=0.0).to(tl.float32)
        # raw blocks are written only where some gate of the producer's tile was nonzero
        m = (row_ok & (g != 0.0))[:, None] & j_ok[None, :]
        off = rows[:, None] * stride_raw_t + (e * R + offs_j)[None, :]
        if HAS_H:
            u += g[:, None] * tl.load(h_ptr + off, mask=m, other=0.0)
        if HAS_DHT:
            du += g[:, None] * tl.load(dht_ptr + off, mask=m, other=0.0)
    du = du * scale
    for e in range(0, E):
        g = tl.load(g_ptr + rows * stride_g_t + e * stride_g_e, mask=row_ok, other=0.0).to(tl.float32)
        out_off = rows[:, None] * stride_buf_t + (e * R + offs_j)[None, :]
        if DH_OUT:
            tl.store(dh_ptr + out_off, (g[:, None] * du).to(dh_ptr.dtype.element_ty), mask=full)
        if HT_OUT:
            tl.store(ht_ptr + out_off, ((scale * g)[:, None] * u).to(ht_ptr.dtype.element_ty), mask=full)
        if DG_OUT:
            off = rows[:, None] * stride_raw_t + (e * R + offs_j)[None, :]
            dht_e = tl.load(dht_ptr + off, mask=full, other=0.0)
            h_e = tl.load(h_ptr + off, mask=full, other=0.0)
            dg = scale * tl.sum(dht_e * u, axis=1) + tl.sum(du * h_e, axis=1)
            tl.store(dg_ptr + rows * stride_dg_t + e * stride_dg_e, dg.to(dg_ptr.dtype.element_ty),
                     mask=row_ok)


@triton.autotune(
    configs=reduce_configs(),
    key=["T_BUCKET", "C", "E", "R", "stride_big_c", "PREC"],
    prune_configs_by={"early_config_prune": prune_reduce},
    cache_results=True,
)
@triton.jit
def _lora_token_reduce_kernel(
    big_ptr,  # (T, C) X (for dA) or dY (for dB)
    small_ptr,  # (T, E*R) dH (for dA) or H~ (for dB), x dtype
    g_ptr,  # (T, E) gates
    out_ptr,  # out[e, c, j] = sum_t big[t, c] * small[t, e, j]: dA (E, R, K) or dB (E, N, R)
    stride_big_t, stride_big_c,  # big strides
    stride_small_t,  # row stride of small (expert block stride R, rank stride 1)
    stride_g_t, stride_g_e,  # gate strides
    stride_o_e, stride_o_c, stride_o_j,  # output strides (expert, column, rank)
    T, C, E, R,  # sizes
    T_BUCKET,  # token-count bucket; autotune key only
    PREC: tl.constexpr,  # tl.dot input precision for fp32 inputs
    BLOCK_R: tl.constexpr,  # padded rank
    EPT: tl.constexpr,  # experts per program (pow2)
    BLOCK_C: tl.constexpr,  # output columns per program
    BLOCK_T: tl.constexpr,  # token step
):
    pid = tl.program_id(0).to(tl.int64)
    n_groups = tl.cdiv(E, EPT)
    # expert groups vary fastest: programs sharing a column tile of the big operand run together
    pid_c = pid // n_groups
    grp = pid % n_groups
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs_g = tl.arange(0, EPT * BLOCK_R)
    ce = grp * EPT + offs_g // BLOCK_R
    cj = offs_g % BLOCK_R
    ce_in = ce < E
    c_ok = ce_in & (cj < R)
    offs_t = tl.arange(0, BLOCK_T)
    big_ptrs = big_ptr + cols[:, None] * stride_big_c + offs_t[None, :] * stride_big_t  # (BC, BT)
    small_ptrs = small_ptr + offs_t[:, None] * stride_small_t + (ce * R + cj)[None, :]  # (BT, EPT*BR)
    g_ptrs = g_ptr + offs_t[:, None] * stride_g_t + ce[None, :] * stride_g_e
    acc = tl.zeros((BLOCK_C, EPT * BLOCK_R), dtype=tl.float32)
    for t in range(0, T, BLOCK_T):
        t_ok = offs_t < T - t
        g = tl.load(g_ptrs, mask=t_ok[:, None] & ce_in[None, :], other=0.0).to(tl.float32)
        nz = g != 0.0
        # Tokens where no expert of this group has a gate contribute nothing: their loads are masked
        # off (no memory traffic) rather than skipped by an `if` over the tile, because Triton does
        # not software-pipeline loads nested in an `if` (compiled for sm_90: no cp.async in the loop).
        row_on = t_ok & (tl.max(nz.to(tl.int32), axis=1) > 0)
        big_t = tl.load(big_ptrs, mask=col_ok[:, None] & row_on[None, :], other=0.0)
        small = tl.load(small_ptrs, mask=nz & c_ok[None, :], other=0.0)
        acc = tl.dot(big_t, small.to(big_t.dtype), acc, input_precision=PREC)
        big_ptrs += BLOCK_T * stride_big_t
        small_ptrs += BLOCK_T * stride_small_t
        g_ptrs += BLOCK_T * stride_g_t
    tl.store(out_ptr + ce.to(tl.int64)[None, :] * stride_o_e + cols[:, None] * stride_o_c
             + cj[None, :] * stride_o_j,
             acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradNeeds:
    """Which gradients the backward launcher must produce."""

    x: bool = True
    lora_a: bool = True
    lora_b: bool = True
    gates: bool = True


def _k_per_split(t: int, k: int) -> int:
    """Reduction length per program of the forward shrink.

    Few tokens leave the shrink with one or two row tiles, i.e. a handful of programs each running
    the whole K loop; splitting K over up to 4 programs (partials summed by the fused GEMM when it
    loads them) shortens that serial chain. Every column tile of the fused GEMM re-reads the
    partials, so more splits would trade the chain for L2 traffic. On GPUs splits are multiples
    of 256, so each starts on a tile boundary of every BLOCK_K in the configs.
    """
    if t_bucket(t) > 64:
        return max(k, 1)
    n_split = max(1, min(4, k // (2 * _SPLIT_GRAIN)))
    return triton.cdiv(triton.cdiv(k, n_split), _SPLIT_GRAIN) * _SPLIT_GRAIN


def lora_mixture_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    mode: str,
) -> torch.Tensor:
    """Forward of the gated multi-LoRA layer in two launches (shrink, fused base+expand GEMM).

    Args:
        x: (T, K) activations, fp16/bf16/fp32.
        weight: (N, K) frozen weight, x's dtype.
        bias: (N,) in x's dtype, or None.
        lora_a: (E, r, K) stacked A (any supported dtype; cast to x's dtype in the kernel).
        lora_b: (E, N, r) stacked B (lora_a's dtype).
        gates: (T, E) gates (any supported dtype).
        scale: alpha / r.
        mode: "output" or "weight".
    Returns:
        (T, N) in x's dtype.
    """
    check_supported(x, weight, bias, lora_a, lora_b, gates, mode)
    x = rows_contiguous(x)
    t_len = x.shape[0]
    n_len = weight.shape[0]
    num_experts, rank, _ = lora_a.shape
    out = alloc((t_len, n_len), dtype=x.dtype, device=x.device)
    if t_len == 0 or n_len == 0:
        return out
    plan = make_plan(t_len, num_experts, rank, x.dtype)
    weight_mode = mode == "weight"
    hbuf = launch_shrink(x, lora_a, gates, scale, plan, weight_mode=weight_mode)
    launch_fused_gemm(
        left=x, right=weight, right_strides=(weight.stride(1), weight.stride(0)),
        lowrank=hbuf, factor=lora_b,
        factor_strides=(lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
        gates=gates, bias=bias, out=out, scale=scale, weight_mode=weight_mode, plan=plan,
    )
    return out


def launch_shrink(x, lora_a, gates, scale, plan, *, weight_mode, zero_fill=False):
    """The forward shrink: (S, T, E*R) buffer of H~ = s G H (output mode) or P = G H (weight mode, fp32),
    S > 1 K-split partials (fp32) for decode-sized batches.

    Blocks of experts with no nonzero gate in a row tile are not written (their consumers mask them
    off); ``zero_fill`` allocates the buffer zeroed instead, for consumers that read every element
    (a dense ``addmm``).
    """
    t_len, k_len = x.shape
    num_experts, rank, _ = lora_a.shape
    k_per_split = _k_per_split(t_len, k_len)
    n_split = triton.cdiv(k_len, k_per_split) if k_len > 0 else 1
    # Partials of a K split, and weight mode's P = G*H, stay fp32 until they are summed.
    shape = (n_split, t_len, num_experts * rank)
    dtype = torch.float32 if (weight_mode or n_split > 1) else x.dtype
    hbuf = (torch.zeros(shape, dtype=dtype, device=x.device) if zero_fill
            else alloc(shape, dtype=dtype, device=x.device))
    n_groups = triton.cdiv(num_experts, plan.ept)
    _lora_shrink_kernel[lambda meta: (triton.cdiv(t_len, meta["BLOCK_M"]) * n_groups * n_split,)](
        x, lora_a, gates, hbuf,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        gates.stride(0), gates.stride(1),
        hbuf.stride(0), hbuf.stride(1),
        t_len, k_len, num_experts, rank, n_split, max(k_per_split, 1), scale, plan.t_bucket,
        OUTPUT_MODE=not weight_mode, PREC=plan.prec, BLOCK_R=plan.block_r, EPT=plan.ept,
    )
    return hbuf


def launch_token_reduce(*, big, small, gates, out, out_strides, plan):
    """out[e, c, j] = sum_t big[t, c] small[t, e, j] over tokens with a nonzero gate."""
    t_len, c_len = big.shape
    num_experts = gates.shape[1]
    rank = small.shape[1] // num_experts
    if c_len == 0:
        return
    n_groups = triton.cdiv(num_experts, plan.ept)
    _lora_token_reduce_kernel[lambda meta: (triton.cdiv(c_len, meta["BLOCK_C"]) * n_groups,)](
        big, small, gates, out,
        big.stride(0), big.stride(1),
        small.stride(0),
        gates.stride(0), gates.stride(1),
        out_strides[0], out_strides[1], out_strides[2],
        t_len, c_len, num_experts, rank, plan.t_bucket,
        PREC=plan.prec, BLOCK_R=plan.block_r, EPT=plan.ept,
    )


def lora_mixture_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    mode: str,
    needs: GradNeeds = GradNeeds(),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of the gated multi-LoRA layer (W frozen): dX, dA, dB, dG.

    Args:
        dy: (T, N) gradient of the output, x's dtype.
        x: (T, K) saved activations.
        weight: (N, K) frozen weight.
        lora_a: (E, r, K); lora_b: (E, N, r).
        gates: (T, E).
        scale: alpha / r.
        mode: "output" or "weight".
        needs: which of dX, dA, dB, dG to produce; the others come back as None.
    Returns:
        (dx (T, K) in x's dtype, da (E, r, K) in lora_a's dtype, db (E, N, r) in lora_b's dtype,
        dg (T, E) in gates' dtype), None where not needed.

    This launcher checks its inputs; the autograd Function's backward skips the checks (its forward
    checked the tensors it saved, and autograd hands back a dY of the output's shape).
    """
    check_supported(x, weight, None, lora_a, lora_b, gates, mode)
    t_len, n_len = x.shape[0], weight.shape[0]
    if tuple(dy.shape) != (t_len, n_len):
        raise ValueError(f"dy must be (T, N)=({t_len}, {n_len}), got {tuple(dy.shape)}")
    return _lora_mixture_bwd(dy, x, weight, lora_a, lora_b, gates, scale, mode, needs)


def _lora_mixture_bwd(dy, x, weight, lora_a, lora_b, gates, scale, mode, needs, expand="fused"):
    """:func:`lora_mixture_bwd` on inputs already checked (the autograd Function's backward).

    ``expand="addmm"`` (the ``triton_addmm`` design, ``triton_addmm.py``) computes dX as
    ``dY W`` (torch matmul) plus ``dH A_cat`` (``addmm_``) instead of the fused GEMM kernel; dH is
    then zero-filled, since the dense ``addmm`` reads the blocks the kernels leave unwritten.
    """
    addmm = expand == "addmm"
    x = rows_contiguous(x)
    dy = rows_contiguous(dy.to(x.dtype))
    t_len, k_len = x.shape
    num_experts, rank, _ = lora_a.shape
    dev = x.device
    dx = alloc((t_len, k_len), dtype=x.dtype, device=dev) if needs.x else None
    # the token reductions write every (e, c, j) of dA / dB, so no zero fill is needed
    da = alloc(lora_a.shape, dtype=lora_a.dtype, device=dev) if needs.lora_a else None
    db = alloc(lora_b.shape, dtype=lora_b.dtype, device=dev) if needs.lora_b else None
    dg = alloc((t_len, num_experts), dtype=gates.dtype, device=dev) if needs.gates else None
    if t_len == 0:
        return dx, *(g.zero_() if g is not None else None for g in (da, db)), dg
    plan = make_plan(t_len, num_experts, rank, x.dtype)
    weight_mode = mode == "weight"
    need_dh = needs.x or needs.lora_a  # dH feeds dX and dA
    need_ht = needs.lora_b  # H~ feeds dB
    er = num_experts * rank

    # 1. dH~ = dY B_cat and the recomputed H, turned into dH / H~ / dG
    dh = ht = None
    if need_dh or need_ht or needs.gates:
        if weight_mode:
            has_dht = need_dh or needs.gates
            has_h = need_ht or needs.gates
            raw_dht = alloc((t_len, er), dtype=torch.float32, device=dev) if has_dht else None
            raw_h = alloc((t_len, er), dtype=torch.float32, device=dev) if has_h else None
            launch_bwd_shrink(dy, x, lora_a, lora_b, gates, raw_dht, raw_h, None, scale, plan,
                              weight_mode=True, compute_all=needs.gates)
            dh = alloc((t_len, er), dtype=x.dtype, device=dev) if need_dh else None
            ht = alloc((t_len, er), dtype=x.dtype, device=dev) if need_ht else None
            launch_weight_combine(raw_dht, raw_h, gates, dh, ht, dg, scale, plan)
        else:
            dh = None
            if need_dh:
                dh = (torch.zeros((t_len, er), dtype=x.dtype, device=dev) if addmm
                      else alloc((t_len, er), dtype=x.dtype, device=dev))
            ht = alloc((t_len, er), dtype=x.dtype, device=dev) if need_ht else None
            launch_bwd_shrink(dy, x, lora_a, lora_b, gates, dh, ht, dg, scale, plan,
                              weight_mode=False, compute_all=needs.gates)

    # 2. dX = [dY | dH] [W ; A_cat]: the forward's fused GEMM kernel with W read untransposed
    #    (addmm: dY W by torch, then dH A_cat added in place; the weight-mode combine writes all of dH)
    if needs.x and addmm:
        torch.mm(dy, weight, out=dx)
        dx.addmm_(dh, lora_a.reshape(er, k_len).to(x.dtype))
    elif needs.x and k_len > 0:
        launch_fused_gemm(
            left=dy, right=weight, right_strides=(weight.stride(0), weight.stride(1)),
            lowrank=dh, factor=lora_a,
            factor_strides=(lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)),
            gates=gates, bias=None, out=dx, scale=1.0, weight_mode=False, plan=plan,
        )
    elif needs.x:
        dx.zero_()
    # 3. reductions over tokens, skipping token tiles where an expert's gates are all zero
    if needs.lora_a:
        launch_token_reduce(big=x, small=dh, gates=gates, out=da,
                            out_strides=(da.stride(0), da.stride(2), da.stride(1)), plan=plan)
    if needs.lora_b:
        launch_token_reduce(big=dy, small=ht, gates=gates, out=db,
                            out_strides=(db.stride(0), db.stride(1), db.stride(2)), plan=plan)
    return dx, da, db, dg


def launch_bwd_shrink(dy, x, lora_a, lora_b, gates, dh, ht, dg, scale, plan, *, weight_mode,
                      compute_all):
    t_len, k_len = x.shape
    n_len = dy.shape[1]
    num_experts, rank, _ = lora_a.shape
    any_buf = next(b for b in (dh, ht, dg) if b is not None)  # stands in for unused outputs
    buf_stride = dh.stride(0) if dh is not None else (ht.stride(0) if ht is not None else 0)
    dg_out = dg is not None and not weight_mode
    n_groups = triton.cdiv(num_experts, plan.ept)
    _lora_bwd_shrink_kernel[lambda meta: (triton.cdiv(t_len, meta["BLOCK_M"]) * n_groups,)](
        dy, x, lora_a, lora_b, gates,
        dh if dh is not None else any_buf,
        ht if ht is not None else any_buf,
        dg if dg is not None else gates,
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        gates.stride(0), gates.stride(1),
        buf_stride,
        dg.stride(0) if dg is not None else 0, dg.stride(1) if dg is not None else 0,
        t_len, n_len, k_len, num_experts, rank, scale, plan.t_bucket,
        WEIGHT_MODE=weight_mode, COMPUTE_ALL=compute_all,
        DH_OUT=dh is not None, H_OUT=ht is not None, DG_OUT=dg_out,
        NEED_DHT=dh is not None or dg_out, NEED_H=ht is not None or dg_out,
        PREC=plan.prec, BLOCK_R=plan.block_r, EPT=plan.ept,
    )


def launch_weight_combine(raw_dht, raw_h, gates, dh, ht, dg, scale, plan):
    """Weight mode's backward combine: u, du, then dH = G du, H~ = s G u and dG from the raw buffers.

    Args:
        raw_dht, raw_h: (T, E*R) fp32 raw dH~ and H written by :func:`launch_bwd_shrink` in weight mode
            (None when not needed; at least one is given).
        gates: (T, E) gates.
        dh, ht: (T, E*R) outputs dH and H~ with one row stride, or None when not wanted.
        dg: (T, E) output dG, or None.
        scale: alpha / r.
        plan: the call's launch plan.
    """
    t_len, num_experts = gates.shape
    any_raw = raw_dht if raw_dht is not None else raw_h
    any_out = dh if dh is not None else (ht if ht is not None else any_raw)  # stands in for unused outputs
    rank = any_raw.shape[1] // num_experts
    block_m = 16
    _lora_weight_combine_kernel[(triton.cdiv(t_len, block_m),)](
        raw_dht if raw_dht is not None else any_raw,
        raw_h if raw_h is not None else any_raw,
        gates,
        dh if dh is not None else any_out,
        ht if ht is not None else any_out,
        dg if dg is not None else gates,
        any_raw.stride(0), any_out.stride(0),
        gates.stride(0), gates.stride(1),
        dg.stride(0) if dg is not None else 0, dg.stride(1) if dg is not None else 0,
        t_len, num_experts, rank, scale,
        HAS_DHT=raw_dht is not None, HAS_H=raw_h is not None, DH_OUT=dh is not None, HT_OUT=ht is not None,
        DG_OUT=dg is not None, BLOCK_R=plan.block_r, BLOCK_M=block_m,
    )


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


def function_forward(ctx, fwd, x, weight, bias, lora_a, lora_b, gates, scale, mode):
    """An autograd Function's forward: flatten to (T, K) / (T, E), run ``fwd`` (a forward launcher
    with :func:`lora_mixture_fwd`'s signature), save what the backward needs."""
    lead, k_len = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k_len)  # (T, K)
    g2 = gates.reshape(-1, gates.shape[-1])  # (T, E)
    y2 = fwd(x2, weight, bias, lora_a, lora_b, g2, scale, mode)
    ctx.save_for_backward(x2, weight, lora_a, lora_b, g2)
    ctx.scale, ctx.mode = scale, mode
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.lead, ctx.gates_shape = lead, gates.shape
    return y2.view(*lead, y2.shape[-1])


def function_backward(ctx, dy, expand="fused"):
    """An autograd Function's backward (see :func:`_lora_mixture_bwd` for ``expand``): the
    gradients of (x, weight, bias, lora_a, lora_b, gates, scale, mode)."""
    x2, weight, lora_a, lora_b, g2 = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_g = ctx.needs_input_grad[:6]
    dy2 = dy.reshape(-1, weight.shape[0])  # (T, N)
    needs = GradNeeds(x=need_x, lora_a=need_a, lora_b=need_b, gates=need_g)
    dx = da = db = dg = None
    if need_x or need_a or need_b or need_g:
        # checked by the forward: the backward trusts the tensors it saved
        dx, da, db, dg = _lora_mixture_bwd(dy2, x2, weight, lora_a, lora_b, g2, ctx.scale,
                                           ctx.mode, needs, expand)
    dw = (dy2.t().to(x2.dtype) @ x2).to(weight.dtype) if need_w else None
    dbias = None
    if need_bias and ctx.has_bias:
        dbias = dy2.float().sum(0).to(ctx.bias_dtype)
    if dx is not None:
        dx = dx.view(*ctx.lead, x2.shape[-1])
    if dg is not None:
        dg = dg.view(ctx.gates_shape)
    return dx, dw, dbias, da, db, dg, None, None


class LoraMixtureTritonFunction(torch.autograd.Function):
    """Triton forward/backward of the gated multi-LoRA layer (see the module docstring).

    Saves x (as (T, K)), the frozen weight, the stacked experts and the gates; H is recomputed in
    backward. dW and db (only when weight / bias require grad) are a plain torch matmul and sum.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, gates, scale: float, mode: str):
        return function_forward(ctx, lora_mixture_fwd, x, weight, bias, lora_a, lora_b, gates, scale, mode)

    @staticmethod
    def backward(ctx, dy):
        return function_backward(ctx, dy)


lora_mixture_triton = LoraMixtureTritonFunction.apply

# The autotuned kernels, for reports of the configs picked per shape (``Autotuner.cache``).
AUTOTUNED_KERNELS = {
    "shrink": _lora_shrink_kernel,
    **FUSED_GEMM_KERNELS,
    "bwd_shrink": _lora_bwd_shrink_kernel,
    "token_reduce": _lora_token_reduce_kernel,
}
