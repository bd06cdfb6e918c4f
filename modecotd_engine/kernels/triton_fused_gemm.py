"""The fused GEMM of the gated multi-LoRA-expert layer: the frozen GEMM and the experts' expand in one
accumulator, shared by the plain op (``triton_lora.py``) and the routed op (``triton_router.py``).

For a row tile and a column tile of the output::

    out = L R + sum_{e active} H~_e F_e (+ b)          one fp32 accumulator, written once

* forward:  L = X (T, K), R = W^T, H~ the shrink's output (T, E*r), F_e = B_e^T, so
  ``Y = [X | H~] [W | B_cat]^T + b``. In output mode the shrink wrote ``H~ = s G H``; in weight mode
  it wrote ``P = G H`` (fp32) and this kernel forms ``u_t = sum_e P[t,e]`` in registers (loads masked
  by the gates, no branch per expert) and then, per expert group, the tile ``H~[t,e] = s G[t,e] u_t`` of
  all the group's experts at once, expanded with one dot per group as in output mode.
  Decode-sized batches hand over K-split partials of the shrink (S slabs), summed here as they are
  loaded.
* backward: L = dY, R = W read untransposed, H~ = dH, F_e = A_e, so ``dX = [dY | dH] [W ; A_cat]``
  (the routed op appends its router blocks to A_cat as extra experts).

An expert group whose gates are all zero in a row tile is skipped; a tile with a single active expert
takes a one-expert path in both modes (one LoRA's work whatever E is). Autotune table and pruner:
``fused_configs`` and ``prune_fused`` in ``triton_configs.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_configs import fused_configs, prune_fused


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share the same column tiles while resident in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _sum_splits(ptrs, mask, n_split, stride_split):
    """Sum of the shrink's split-K partials (n_split == 1 outside decode) in fp32."""
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for s in range(1, n_split):
        acc += tl.load(ptrs + s * stride_split, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.autotune(
    configs=fused_configs(),
    key=["T_BUCKET", "C", "D", "E", "R", "stride_r_d", "WEIGHT_MODE", "HAS_BIAS", "PREC"],
    prune_configs_by={"early_config_prune": prune_fused},
    cache_results=True,
)
@triton.jit
def _lora_fused_gemm_kernel(
    l_ptr,  # (T, D) left operand of the frozen GEMM: X (forward) or dY (dX)
    r_ptr,  # frozen weight read as (D, C): W^T (forward) or W (dX)
    lr_ptr,  # (S, T, E*R) low-rank left operand: H~ or P (forward, S K-split partials), dH (dX, S=1)
    rr_ptr,  # stacked low-rank right factor, element (e, j, c): B[e, c, j] (forward) or A[e, j, c] (dX)
    g_ptr,  # (T, E) gates
    bias_ptr,  # (C,) bias, read only when HAS_BIAS
    out_ptr,  # (T, C) output, written once
    stride_l_t, stride_l_d,  # l strides
    stride_r_d, stride_r_c,  # r strides (reduction, output column)
    stride_lr_s, stride_lr_t,  # split and row strides of lr (expert block stride R, rank stride 1)
    stride_rr_e, stride_rr_j, stride_rr_c,  # rr strides (expert, rank, output column)
    stride_g_t, stride_g_e,  # gate strides
    stride_bias,  # bias stride
    stride_o_t, stride_o_c,  # output strides
    T, C, D, E, R,  # sizes: tokens, output columns, frozen reduction, experts, rank
    n_split,  # S: partial slabs of lr to sum
    scale,  # s, used by weight mode's on-the-fly H~ = s*G*u
    T_BUCKET,  # token-count bucket; autotune key only
    HAS_BIAS: tl.constexpr,  # add bias_ptr
    WEIGHT_MODE: tl.constexpr,  # lr holds P = G*H: expand with s*G[t,e]*u_t, u_t = sum_e P[t,e]
    PREC: tl.constexpr,  # tl.dot input precision for fp32 inputs
    BLOCK_R: tl.constexpr,  # padded rank (pow2 >= 16)
    E_PAD: tl.constexpr,  # pow2 >= E, >= 2
    EPT: tl.constexpr,  # experts per grouped expand step (pow2)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # output columns per program
    BLOCK_D: tl.constexpr,  # frozen reduction step
    GROUP_M: tl.constexpr,  # row tiles per L2 group
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_c = _swizzle(pid, tl.cdiv(T, BLOCK_M), tl.cdiv(C, BLOCK_C), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < T
    col_ok = cols < C
    dt = l_ptr.dtype.element_ty

    # frozen part: X W^T (or dY W), the bulk of the FLOPs
    offs_d = tl.arange(0, BLOCK_D)
    l_ptrs = l_ptr + rows[:, None] * stride_l_t + offs_d[None, :] * stride_l_d
    r_ptrs = r_ptr + offs_d[:, None] * stride_r_d + cols[None, :] * stride_r_c
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d
        a = tl.load(l_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(r_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        l_ptrs += BLOCK_D * stride_l_d
        r_ptrs += BLOCK_D * stride_r_d

    # low-rank part: the rest of the concatenated reduction axis, into the same accumulator
    offs_j = tl.arange(0, BLOCK_R)
    j_ok = offs_j < R
    offs_e = tl.arange(0, E_PAD)
    g_all = tl.load(g_ptr + rows[:, None] * stride_g_t + offs_e[None, :] * stride_g_e,
                    mask=row_ok[:, None] & (offs_e < E)[None, :], other=0.0).to(tl.float32)
    e_act = tl.max((g_all != 0.0).to(tl.int32), axis=0)  # (E_PAD,)
    n_act = tl.sum(e_act, axis=0)
    if n_act == 1:
        # one active expert: H~ = h (output mode) or s*G*u with u = P of that expert (weight mode)
        e1 = tl.sum(e_act * offs_e, axis=0).to(tl.int64)
        g1 = tl.load(g_ptr + rows * stride_g_t + e1 * stride_g_e, mask=row_ok, other=0.0)
        h = _sum_splits(lr_ptr + rows[:, None] * stride_lr_t + (e1 * R + offs_j)[None, :],
                        (row_ok & (g1.to(tl.float32) != 0.0))[:, None] & j_ok[None, :],
                        n_split, stride_lr_s)
        if WEIGHT_MODE:
            h = h * (scale * g1.to(tl.float32))[:, None]
        w = tl.load(rr_ptr + e1 * stride_rr_e + offs_j[:, None] * stride_rr_j
                    + cols[None, :] * stride_rr_c,
                    mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h.to(dt), w.to(dt), acc, input_precision=PREC)
    elif n_act > 1:
        offs_g = tl.arange(0, EPT * BLOCK_R)
        gj = offs_g % BLOCK_R
        if WEIGHT_MODE:
            # u_t = sum_e P[t,e], one (BLOCK_M, BLOCK_R) block per expert; zero gates mask their loads
            # off (no `if` in this loop)
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            offs_i = tl.arange(0, EPT)  # expert within a group (the expand below)
            for e in range(0, E):
                g_u = tl.load(g_ptr + rows * stride_g_t + e * stride_g_e, mask=row_ok, other=0.0)
                u += _sum_splits(lr_ptr + rows[:, None] * stride_lr_t + (e * R + offs_j)[None, :],
                                 (row_ok & (g_u.to(tl.float32) != 0.0))[:, None] & j_ok[None, :],
                                 n_split, stride_lr_s)
        for e0 in range(0, E, EPT):
            ce = (e0 + offs_g // BLOCK_R).to(tl.int64)  # (EPT*BLOCK_R,)
            ce_in = ce < E
            if WEIGHT_MODE:
                ge = (e0 + offs_i).to(tl.int64)
                gg = tl.load(g_ptr + rows[:, None] * stride_g_t + ge[None, :] * stride_g_e,
                             mask=row_ok[:, None] & (ge < E)[None, :], other=0.0).to(tl.float32)
                g_act = tl.max((gg != 0.0).to(tl.int32), axis=0)  # (EPT,) expert has a nonzero gate
                c_act = tl.reshape(tl.broadcast_to(g_act[:, None], (EPT, BLOCK_R)), (EPT * BLOCK_R,)) > 0
            else:
                g2 = tl.load(g_ptr + rows[:, None] * stride_g_t + ce[None, :] * stride_g_e,
                             mask=row_ok[:, None] & ce_in[None, :], other=0.0).to(tl.float32)
                nz = g2 != 0.0
                c_act = tl.max(nz.to(tl.int32), axis=0) > 0
            if tl.sum(c_act.to(tl.int32), axis=0) > 0:
                c_ok = ce_in & (gj < R)
                if WEIGHT_MODE:
                    # H~ = s*G*u for the group's experts at once, rounded like the torch path
                    h = tl.reshape((u[:, None, :] * (scale * gg)[:, :, None]).to(dt),
                                   (BLOCK_M, EPT * BLOCK_R))
                else:
                    h = _sum_splits(lr_ptr + rows[:, None] * stride_lr_t + (ce * R + gj)[None, :],
                                    nz & c_ok[None, :], n_split, stride_lr_s)
                w = tl.load(rr_ptr + ce[:, None] * stride_rr_e + gj[:, None] * stride_rr_j
                            + cols[None, :] * stride_rr_c,
                            mask=(c_ok & c_act)[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(h.to(dt), w.to(dt), acc, input_precision=PREC)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o_t + cols[None, :] * stride_o_c,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def launch_fused_gemm(*, left, right, right_strides, lowrank, factor, factor_strides, gates, bias,
                      out, scale, weight_mode, plan):
    """out = left @ right(D, C) + lowrank-part (+ bias): forward Y or backward dX."""
    t_len, d_len = left.shape
    c_len = out.shape[1]
    num_experts = gates.shape[1]
    if lowrank.dim() == 2:
        lowrank = lowrank.unsqueeze(0)  # (S=1, T, E*R)
    rank = lowrank.shape[2] // num_experts
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    _lora_fused_gemm_kernel[
        lambda meta: (triton.cdiv(t_len, meta["BLOCK_M"]) * triton.cdiv(c_len, meta["BLOCK_C"]),)
    ](
        left, right, lowrank, factor, gates, bias_arg, out,
        left.stride(0), left.stride(1),
        right_strides[0], right_strides[1],
        lowrank.stride(0), lowrank.stride(1),
        factor_strides[0], factor_strides[1], factor_strides[2],
        gates.stride(0), gates.stride(1),
        bias.stride(0) if bias is not None else 0,
        out.stride(0), out.stride(1),
        t_len, c_len, d_len, num_experts, rank, lowrank.shape[0], scale, plan.t_bucket,
        HAS_BIAS=bias is not None, WEIGHT_MODE=weight_mode, PREC=plan.prec,
        BLOCK_R=plan.block_r, E_PAD=plan.e_pad, EPT=plan.ept,
    )


# The autotuned kernel of this file, for reports of the configs picked per shape (``Autotuner.cache``).
AUTOTUNED_KERNELS = {"fused_gemm": _lora_fused_gemm_kernel}
