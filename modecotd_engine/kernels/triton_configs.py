"""Autotune configs of the Triton kernels, keyed by token-count bucket and pruned by shape.

Every autotuned kernel of ``triton_lora.py`` and ``triton_fused_gemm.py`` gets a table here (the routed
op of ``triton_router.py`` runs the same fused GEMM, backward shrink and token reduction, and its
router shrink extends the forward shrink's table), plus the functions that build the tables and prune them: shared-memory fit, the
token bucket, small tiles for IEEE fp32.

Each table function takes ``interpret`` (default: whether ``TRITON_INTERPRET=1`` was set at import, which
is what the kernels are decorated with): the interpreter gets one small config per kernel, a GPU the full
table. Tests ask for the GPU tables (``interpret=False``) to run every one of their configs under the
interpreter against the float64 oracle (tests/test_kernel_configs_interpret.py).
"""

from __future__ import annotations

import os

import torch
import triton

from .triton_utils import INTERPRET, next_pow2

# NOTE: tuning constants. Not yet timed on a GPU; they are starting points derived from the Triton
# matmul tutorial's CUDA config list (H100-class tiles: 128x256x64 with 8 warps / 3 stages, 128x128x64
# with 4 warps / 4 stages) and from tile arithmetic: shared memory = stages * (BM*BK*bytes_a + BK*BN*bytes_b),
# fp32 accumulators <= ~128 registers per thread. Every config below was compiled ahead of time for
# sm_90 with Triton 3.9 (no GPU needed for that; `benchmarks/compile_sm90.py`, docs/bench/compile-sm90):
# all compile, the fused kernel's K loop is software-pipelined into wgmma like a plain matmul's, and no
# config kept by the pruners below allocates more shared memory than the estimate says.
# `benchmarks/run_kernels.py` is where the timings get confirmed: the triton rows of its JSON name
# the config the autotuner picked per kernel and shape. MODECOTD_TRITON_TUNE=quick (the GPU tests set
# it) takes the first fitting config per shape instead of benchmarking 2-5 of them.
# Every autotuned kernel keys on PREC (IEEE fp32 keeps only small tiles, so tf32 and ieee calls of
# one shape prune to different candidates) and is declared with cache_results=True: a tuned shape is
# kept in Triton's cache directory (TRITON_CACHE_DIR, ~/.triton/cache) and a later process reads
# the choice instead of benchmarking again. Hence the pruners hand Triton plain configs (see plain).
#
# Fallback shared-memory limit (bytes) when the driver cannot be asked (A100-class is 163 KiB).
SMEM_FALLBACK = 160 * 1024


def smem_limit() -> int:
    try:
        dev = torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"])
    except Exception:  # no driver query available: be conservative
        return SMEM_FALLBACK


def make_config(num_warps: int, num_stages: int, **blocks) -> triton.Config:
    # tl.dot needs every tile dimension >= 16 on GPUs; the interpreter would not catch a smaller one.
    assert all(v >= 16 for k, v in blocks.items() if k.startswith("BLOCK")), blocks
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def keep_fitting(configs, smem_of, limit):
    """Drop configs whose shared-memory estimate exceeds the device. When none fits, the same tiles
    with 2 pipeline stages are tried (fp32 LoRA operands next to 16-bit activations double the
    factor's tiles: the decode shrink's 16x128 tile with 4 stages needs 279 KB for fp32 A by the
    estimate, 209 KB as Triton 3.9 allocates it for sm_90); then the smallest.

    MODECOTD_TRITON_TUNE=quick keeps only the first survivor (test runs: one compile per kernel
    and shape instead of 2-5; the default "full" benchmarks them all).
    """
    fitting = [c for c in configs if smem_of(c) <= limit]
    if not fitting:
        fewer = [with_stages(c, 2) for c in configs if c.num_stages > 2]
        fitting = [c for c in fewer if smem_of(c) <= limit] or [min(configs + fewer, key=smem_of)]
    if os.environ.get("MODECOTD_TRITON_TUNE", "full") == "quick":
        fitting = fitting[:1]
    return fitting


def plain(configs) -> list[triton.Config]:
    """The configs as bare ``triton.Config`` objects, without the token buckets (and the router's
    ``spare`` flag) the tables attach. What a pruner hands the autotuner must be plain: with
    ``cache_results=True`` Triton writes each benchmarked config's ``__dict__`` as JSON (a set of
    buckets is not JSON) and rebuilds it with ``Config(**fields)`` (which takes no extra fields)."""
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, num_ctas=c.num_ctas,
                          maxnreg=c.maxnreg) for c in configs]


def with_stages(config, num_stages: int) -> triton.Config:
    """A copy of ``config`` with another pipeline depth (its token buckets kept)."""
    c = triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=num_stages)
    c.buckets = getattr(config, "buckets", None) or set()
    return c


def tile_bytes(rows: int, cols: int, tensor) -> int:
    """Bytes of one (rows x cols) tile of ``tensor``'s elements in shared memory: each operand at its
    own element size (an fp32 factor next to bf16 activations is staged in fp32, cast before the dot)."""
    return rows * cols * tensor.element_size()


def bucketed(table, names):
    """Configs from {bucket: [(block sizes..., num_warps, num_stages)]}; each config remembers the
    token buckets it is tried for, so one autotune key benchmarks only 2-5 candidates (every
    candidate costs a compile on first use)."""
    by_params: dict[tuple, triton.Config] = {}
    for bucket, rows in table.items():
        for row in rows:
            if row not in by_params:
                *blocks, warps, stages = row
                by_params[row] = make_config(warps, stages, **dict(zip(names, blocks)))
                by_params[row].buckets = set()
            by_params[row].buckets.add(bucket)
    return list(by_params.values())


def for_bucket(configs, t_bucket):
    return [c for c in configs if t_bucket in getattr(c, "buckets", (t_bucket,))] or list(configs)


def prune_by(configs, named_args, prec, *, block, extent, tile_elems, ieee_limit, smem):
    """The pruning every table goes through: the configs of the call's token bucket, ``block`` tiles no
    wider than the padded ``extent`` they cover, small tiles for IEEE fp32 (``tile_elems`` <=
    ``ieee_limit``), then the shared-memory fit of ``smem``."""
    if len(configs) == 1:
        return configs
    cand = for_bucket(configs, named_args["T_BUCKET"])
    cand = [c for c in cand if c.kwargs[block] <= max(32, next_pow2(extent))] or cand
    cand = small_tiles_for_ieee(cand, prec, tile_elems, ieee_limit)
    return plain(keep_fitting(cand, smem, smem_limit()))


def small_tiles_for_ieee(configs, prec, tile_elems, limit):
    """IEEE fp32 dots run on FMA units: big tiles gain nothing there and compile for minutes
    (a 128x128 fused tile took 128 s for sm_90 with Triton 3.9), so fp32 keeps the small ones."""
    if prec != "ieee":
        return configs
    return [c for c in configs if tile_elems(c) <= limit] or [min(configs, key=tile_elems)]


# Token buckets 1024 and 4096 share the prefill/training tiles.
LARGE_BUCKETS = (1024, 4096)


def fused_configs(interpret: bool = INTERPRET):
    # Under the interpreter the producers of the low-rank buffers (shrink kernels) use smaller row
    # tiles than their consumers, as autotuned GPU configs may: tests then catch any consumer that
    # reads a block its producer skipped (buffers are NaN-filled there, see alloc).
    if interpret:
        return [make_config(4, 1, BLOCK_M=32, BLOCK_C=64, BLOCK_D=32, GROUP_M=4)]
    # NOTE: 64x256 runs with 8 warps: with 4 it spilled up to 5,376 B per thread compiled for sm_90
    # (docs/bench/compile-sm90: the LoRA tail's operands on top of the 64x256 fp32 accumulator).
    large = [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3),
             (64, 256, 64, 8, 8, 4), (64, 64, 64, 8, 4, 2)]
    table = {
        # decode: one 16-row tile; narrow column tiles spread the weight read over all SMs
        16: [(16, 64, 128, 8, 4, 4), (16, 32, 128, 8, 4, 4), (16, 128, 64, 8, 4, 4),
             (16, 64, 256, 8, 4, 3)],
        64: [(32, 64, 128, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)],
        256: [(64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 2)],
        **{b: large for b in LARGE_BUCKETS},
    }
    return bucketed(table, ("BLOCK_M", "BLOCK_C", "BLOCK_D", "GROUP_M"))


def prune_fused(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    c_len, d_len = named_args["C"], named_args["D"]
    left, right, low, factor = (named_args[k] for k in ("l_ptr", "r_ptr", "lr_ptr", "rr_ptr"))
    lora_cols = kwargs["EPT"] * kwargs["BLOCK_R"]
    cand = for_bucket(configs, named_args["T_BUCKET"])
    cand = [c for c in cand if c.kwargs["BLOCK_C"] <= max(32, next_pow2(c_len))
            and c.kwargs["BLOCK_D"] <= max(32, next_pow2(d_len))] or cand
    cand = small_tiles_for_ieee(cand, kwargs["PREC"],
                                lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_C"], 64 * 64)

    def smem(c):
        # The low-rank tail reuses the pipeline's buffers once the frozen K loop is done (checked by
        # compiling for sm_90 with Triton 3.9: 128x256x64, 3 stages, bf16 -> 147,456 bytes).
        bm, bc, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_D"]
        return max(c.num_stages * (tile_bytes(bm, bd, left) + tile_bytes(bd, bc, right)),
                   tile_bytes(bm, lora_cols, low) + tile_bytes(lora_cols, bc, factor))

    return plain(keep_fitting(cand, smem, smem_limit()))


def shrink_configs(interpret: bool = INTERPRET):
    if interpret:
        return [make_config(4, 1, BLOCK_M=16, BLOCK_K=32)]
    # NOTE: no 128x64 tile with 4 warps: it spilled in each of 12 sm_90 compilations (docs/bench/compile-sm90)
    large = [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3)]
    table = {
        16: [(16, 128, 4, 4), (16, 256, 4, 3)],
        64: [(32, 128, 4, 4), (64, 64, 4, 4)],
        256: [(64, 64, 4, 4), (64, 128, 4, 3), (32, 128, 4, 4)],
        **{b: large for b in LARGE_BUCKETS},
    }
    return bucketed(table, ("BLOCK_M", "BLOCK_K"))


def prune_shrink(configs, named_args, **kwargs):
    x, a = named_args["x_ptr"], named_args["a_ptr"]
    cols = kwargs["EPT"] * kwargs["BLOCK_R"]

    def smem(c):
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        return c.num_stages * (tile_bytes(bm, bk, x) + tile_bytes(bk, cols, a))

    return prune_by(configs, named_args, kwargs["PREC"], block="BLOCK_K", extent=named_args["K"],
                    tile_elems=lambda c: c.kwargs["BLOCK_M"] * cols, ieee_limit=64 * 128, smem=smem)


def bwd_shrink_configs(interpret: bool = INTERPRET):
    if interpret:
        return [make_config(4, 1, BLOCK_M=16, BLOCK_D=32)]
    # two (BM x 128) fp32 accumulators live at once: BM <= 64 keeps them in registers
    # NOTE: (64, 64) with 4 warps spilled in each of 9 sm_90 compilations (up to 1,052 B), with 8 never
    large = [(64, 64, 8, 3), (64, 128, 8, 3)]
    table = {
        16: [(16, 128, 4, 4), (16, 64, 4, 4)],
        64: [(32, 128, 4, 3), (32, 64, 4, 4)],
        256: [(32, 128, 4, 3), (64, 64, 8, 3)],
        **{b: large for b in LARGE_BUCKETS},
    }
    return bucketed(table, ("BLOCK_M", "BLOCK_D"))


def prune_bwd_shrink(configs, named_args, **kwargs):
    x, factor = named_args["x_ptr"], max(named_args["a_ptr"], named_args["b_ptr"], key=lambda t: t.element_size())
    cols = kwargs["EPT"] * kwargs["BLOCK_R"]

    def smem(c):
        bm, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"]
        return c.num_stages * (tile_bytes(bm, bd, x) + tile_bytes(bd, cols, factor))

    return prune_by(configs, named_args, kwargs["PREC"], block="BLOCK_D",
                    extent=max(named_args["N"], named_args["K"]),
                    tile_elems=lambda c: c.kwargs["BLOCK_M"] * cols, ieee_limit=32 * 128, smem=smem)


def reduce_configs(interpret: bool = INTERPRET):
    if interpret:
        return [make_config(4, 1, BLOCK_C=64, BLOCK_T=32)]
    # few tokens: short token steps; many tokens: long steps amortise the gate check per step
    small = [(64, 16, 4, 2), (128, 16, 4, 2), (64, 32, 4, 3)]
    # NOTE: 64x128 token steps run with 8 warps: with 4 they spilled up to 4,952 B in every sm_90 compilation
    large = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 8, 3)]
    table = {16: small, 64: small, 256: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
             **{b: large for b in LARGE_BUCKETS}}
    return bucketed(table, ("BLOCK_C", "BLOCK_T"))


def prune_reduce(configs, named_args, **kwargs):
    big, small = named_args["big_ptr"], named_args["small_ptr"]
    cols = kwargs["EPT"] * kwargs["BLOCK_R"]

    def smem(c):
        bc, bt = c.kwargs["BLOCK_C"], c.kwargs["BLOCK_T"]
        return c.num_stages * (tile_bytes(bt, bc, big) + tile_bytes(bt, cols, small))

    return prune_by(configs, named_args, kwargs["PREC"], block="BLOCK_C", extent=named_args["C"],
                    tile_elems=lambda c: c.kwargs["BLOCK_C"] * cols, ieee_limit=64 * 128, smem=smem)
