"""Autotune pruning (kernels/triton_configs.py): shared-memory estimates per operand element size, and
a config that fits whenever the tiles allow one. Pure config arithmetic: nothing is compiled here
(benchmarks/compile_sm90.py compiles the kept configs for sm_90 and checks them against Triton's own
allocation)."""

from __future__ import annotations

import torch

from modecotd_engine.kernels import triton_configs as tc

H200 = 232_448


def _args(x_dtype, lora_dtype, t_bucket=16, k=576, n=576):
    x = torch.empty(0, dtype=x_dtype)
    a = torch.empty(0, dtype=lora_dtype)
    return {"x_ptr": x, "a_ptr": a, "b_ptr": a, "T_BUCKET": t_bucket, "K": k, "N": n}


def _decode_shrink_table():
    return tc.bucketed({16: [(16, 128, 4, 4), (16, 256, 4, 3)]}, ("BLOCK_M", "BLOCK_K"))


def test_fp32_factor_counts_at_four_bytes(monkeypatch):
    monkeypatch.setattr(tc, "smem_limit", lambda: H200)
    kw = {"EPT": 8, "BLOCK_R": 16, "PREC": "tf32"}
    bf16 = tc.prune_shrink(_decode_shrink_table(), _args(torch.bfloat16, torch.bfloat16), **kw)
    assert [(c.kwargs["BLOCK_K"], c.num_stages) for c in bf16] == [(128, 4), (256, 3)]  # 147 KB and 184 KB
    # fp32 A: 4 * (16*128*2 + 128*128*4) = 278,528 B and 3 * (16*256*2 + 256*128*4) = 417,792 B: neither
    # fits, so the same tiles come back with 2 stages (139,264 B and 278,528 B): only the first fits
    fp32 = tc.prune_shrink(_decode_shrink_table(), _args(torch.bfloat16, torch.float32), **kw)
    assert [(c.kwargs["BLOCK_K"], c.num_stages) for c in fp32] == [(128, 2)]


def test_keep_fitting_prefers_configs_that_fit_and_keeps_the_smallest_otherwise():
    cfgs = tc.bucketed({16: [(16, 64, 4, 4), (16, 128, 4, 3)]}, ("BLOCK_M", "BLOCK_K"))
    size = lambda c: c.num_stages * c.kwargs["BLOCK_K"]  # noqa: E731
    assert [size(c) for c in tc.keep_fitting(cfgs, size, 300)] == [256]
    two = tc.keep_fitting(cfgs, size, 200)  # none fits at its own depth; 2 stages: 128 and 256
    assert [(c.kwargs["BLOCK_K"], c.num_stages) for c in two] == [(64, 2)] and two[0].buckets == {16}
    assert [size(c) for c in tc.keep_fitting(cfgs, size, 10)] == [128]  # nothing fits: the smallest


def test_fused_gemm_estimate_uses_each_operand(monkeypatch):
    monkeypatch.setattr(tc, "smem_limit", lambda: 10**9)
    estimates = []

    def keep(cand, smem, limit):
        estimates.append(smem)
        return cand

    monkeypatch.setattr(tc, "keep_fitting", keep)
    cfgs = tc.bucketed({16: [(16, 64, 128, 8, 4, 4), (16, 32, 128, 8, 4, 4)]},
                       ("BLOCK_M", "BLOCK_C", "BLOCK_D", "GROUP_M"))
    bf, f32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.float32)
    named = {"C": 576, "D": 576, "T_BUCKET": 16, "l_ptr": bf, "r_ptr": bf, "lr_ptr": f32, "rr_ptr": f32}
    tc.prune_fused(cfgs, named, EPT=8, BLOCK_R=16, PREC="tf32")
    c = cfgs[0]  # 16x64 output tile, 128-deep K steps, 4 stages; 128 low-rank columns in fp32
    assert estimates[0](c) == max(4 * (16 * 128 * 2 + 128 * 64 * 2), 16 * 128 * 4 + 128 * 64 * 4)


def test_gpu_tables_are_built_on_request_and_the_runtime_keeps_its_own():
    # the interpreter's kernels keep their one config; the GPU tables are there for the asking
    from modecotd_engine.kernels import triton_utils

    gpu = {name: len(fn(interpret=False)) for name, fn in (
        ("fused", tc.fused_configs), ("shrink", tc.shrink_configs), ("bwd_shrink", tc.bwd_shrink_configs),
        ("reduce", tc.reduce_configs))}
    assert all(n > 1 for n in gpu.values()), gpu
    assert len(tc.shrink_configs(interpret=True)) == 1
    if triton_utils.INTERPRET:
        from modecotd_engine.kernels.triton_lora import AUTOTUNED_KERNELS

        assert all(len(k.configs) == 1 for k in AUTOTUNED_KERNELS.values())


def test_pruned_configs_survive_the_autotuners_disk_cache(monkeypatch):
    # cache_results=True: Triton writes each benchmarked config's __dict__ as JSON and rebuilds it
    # with Config(**fields); the tables' bookkeeping (token buckets, spare) must not reach it
    import json

    import triton

    from modecotd_engine.kernels import triton_router

    monkeypatch.setattr(tc, "smem_limit", lambda: H200)
    monkeypatch.setattr(triton_router, "smem_limit", lambda: H200)
    bf = torch.empty(0, dtype=torch.bfloat16)
    kw = {"EPT": 8, "BLOCK_R": 16, "PREC": "tf32"}
    pruned = {
        "shrink": tc.prune_shrink(tc.shrink_configs(interpret=False), _args(torch.bfloat16, torch.bfloat16), **kw),
        "fused": tc.prune_fused(tc.fused_configs(interpret=False),
                                {"C": 576, "D": 576, "T_BUCKET": 16, "l_ptr": bf, "r_ptr": bf, "lr_ptr": bf,
                                 "rr_ptr": bf}, **kw),
        "router": triton_router._prune_router_shrink(
            triton_router.router_shrink_configs(interpret=False),
            {"x_ptr": bf, "a_ptr": bf, "rt_ptr": bf, "T_BUCKET": 16, "K": 576}, **kw, Z_PAD=16),
    }
    for name, configs in pruned.items():
        assert configs, name
        stored = json.loads(json.dumps([(c.__dict__, [1.0, 1.0, 1.0]) for c in configs]))
        back = [triton.Config(**fields) for fields, _ in stored]
        assert back == configs, name


def test_every_autotuned_kernel_keys_on_its_dot_precision():
    # IEEE fp32 prunes to small tiles: a tf32 choice must not be reused for an ieee call of one shape
    from modecotd_engine.kernels.triton_lora import AUTOTUNED_KERNELS
    from modecotd_engine.kernels.triton_router import AUTOTUNED_KERNELS as ROUTED

    for name, kernel in {**AUTOTUNED_KERNELS, **ROUTED}.items():
        assert "PREC" in kernel.keys, name
