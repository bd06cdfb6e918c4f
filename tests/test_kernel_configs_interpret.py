"""Every config of the GPU autotune tables, run once under Triton's interpreter against the float64 oracle.

The interpreter's kernels are decorated with one small config each (kernels/triton_configs.py), so
tests/test_kernels_triton.py never runs the tiles a GPU's autotuner picks from; and the GPU tests set
MODECOTD_TRITON_TUNE=quick, which runs only the first fitting config per shape. Here each kernel
family's GPU table (``*_configs(interpret=False)``) is walked config by config: the family's
autotuner is handed that one config (the other kernels keep the interpreter's), with the GPU's
expert grouping (``GROUP_COLS``), and the whole op runs forward and backward (every gradient,
both modes) against the float64 oracle with the budget of tests/test_kernels_triton.py.
Warps and pipeline stages mean nothing to the interpreter, so configs that differ only in those
run once. The shapes are small but never a multiple of a tile: partial row, column and reduction
tiles, two expert groups, decode-sized batches for the decode buckets (the forward shrink then
splits K).

The last test checks the launch path's bookkeeping: each validation runs once per call.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("runs the GPU configs under Triton's interpreter (TRITON_INTERPRET=1, no CUDA)",
                allow_module_level=True)
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_triton import check_against_oracle, make_case  # noqa: E402
from test_router_triton import check_against_oracle as check_routed  # noqa: E402
from test_router_triton import make_case as make_routed_case  # noqa: E402

from modecotd_engine.kernels import triton_configs, triton_lora, triton_router, triton_utils  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (autotuned kernel, GPU table)
FAMILIES = {
    "shrink": (triton_lora.AUTOTUNED_KERNELS["shrink"], triton_configs.shrink_configs),
    "fused_gemm": (triton_lora.AUTOTUNED_KERNELS["fused_gemm"], triton_configs.fused_configs),
    "bwd_shrink": (triton_lora.AUTOTUNED_KERNELS["bwd_shrink"], triton_configs.bwd_shrink_configs),
    "token_reduce": (triton_lora.AUTOTUNED_KERNELS["token_reduce"], triton_configs.reduce_configs),
    "router_shrink": (triton_router.AUTOTUNED_KERNELS["router_shrink"], triton_router.router_shrink_configs),
}
# the gate patterns cycled over the configs of the plain op (dG on dense gates; sparse one-hot rows
# with a padding run; two experts per row)
PATTERNS = ("dense_softmax", "one_hot_padded", "top2", "zipf")


def _gpu_configs(family: str) -> list:
    """The family's GPU table, one config per distinct set of block sizes (warps and stages are
    not simulated by the interpreter), with the smallest token bucket it is tried for."""
    seen: dict[tuple, object] = {}
    for c in FAMILIES[family][1](interpret=False):
        seen.setdefault(tuple(sorted(c.kwargs.items())), c)
    return list(seen.values())


def _cases():
    out = []
    for family in FAMILIES:
        for i, c in enumerate(_gpu_configs(family)):
            blocks = "-".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in c.kwargs.items())
            out.append(pytest.param(family, i, id=f"{family}-{blocks}"))
    return out


def _tokens(config) -> int:
    """A token count in the config's smallest bucket, not a multiple of its row tile: decode and
    small-batch buckets get decode-sized batches, the others two row tiles, the last one partial."""
    bucket = min(getattr(config, "buckets", None) or {4096})
    return {16: 7, 64: 40}.get(bucket, 133)


@pytest.fixture
def gpu_grouping(monkeypatch):
    # the GPU's 128 grouped low-rank columns (the interpreter's 32 would halve every expert group)
    monkeypatch.setattr(triton_utils, "GROUP_COLS", triton_utils.GPU_GROUP_COLS)


@pytest.mark.parametrize("family,index", _cases())
def test_every_gpu_config_matches_oracle(family, index, gpu_grouping, monkeypatch):
    kernel, _ = FAMILIES[family]
    config = _gpu_configs(family)[index]
    monkeypatch.setattr(kernel, "configs", [config])  # one config: the autotuner runs it as is
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "best_config", None, raising=False)
    t = _tokens(config)
    # E=10, r=5: 8 experts of padded rank 16 per group, a second group of 2; E=5, r=20: 4 of 32 and 1
    e, r = (10, 5) if index % 2 == 0 else (5, 20)
    for j, mode in enumerate(("output", "weight")):
        seed = 1000 * len(family) + 10 * index + j
        if family == "router_shrink":
            case = make_routed_case(t=t, k=300, n=130, e=e, r=r, seed=seed)
            check_routed(case, 2 if (index + j) % 2 else 0, mode)
        else:
            case = make_case(t=t, k=300, n=130, e=e, r=r, pattern=PATTERNS[(index + j) % len(PATTERNS)],
                             bias=j == 0, seed=seed)
            check_against_oracle(case, mode)
    assert kernel.best_config is config  # the op ran the family's kernel with this config


def test_the_gpu_tables_are_walked_whole():
    # every block-size combination of every table is among the parametrized cases
    for family, (kernel, table) in FAMILIES.items():
        blocks = {tuple(sorted(c.kwargs.items())) for c in table(interpret=False)}
        assert len(_gpu_configs(family)) == len(blocks) > 1, family
        assert len(kernel.configs) == 1  # the interpreter's own table is untouched


def test_each_check_runs_once_per_call(monkeypatch):
    """Forward validates (argument checks, backend choice, the kernels' own checks); the backward
    trusts what the forward saved; the routed path checks its router once."""
    from modecotd_engine.kernels import lora_mixture, ops, router
    from modecotd_engine.kernels.router import routed_lora_mixture

    calls: dict[str, int] = {}

    def count(module, name):
        fn = getattr(module, name)

        def wrapped(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)

        monkeypatch.setattr(module, name, wrapped)

    for module, name in ((ops, "check_mixture_args"), (ops, "resolve_backend"), (router, "check_mixture_args"),
                         (router, "check_router_args"), (router, "resolve_backend"),
                         (triton_router, "check_router_args"), (triton_lora, "check_supported"),
                         (triton_router, "check_supported")):
        count(module, name)

    case = make_case(t=9, pattern="dense_softmax", seed=3)
    leaves = {k: case[k].clone().requires_grad_(k in ("x", "lora_a", "lora_b", "gates"))
              for k in ("x", "weight", "lora_a", "lora_b", "gates")}
    y = lora_mixture(leaves["x"], leaves["weight"], case["bias"], leaves["lora_a"], leaves["lora_b"],
                     leaves["gates"], 0.5, "weight", backend="triton")
    y.backward(case["dy"])
    assert calls == {"check_mixture_args": 1, "resolve_backend": 1, "check_supported": 1}, calls

    calls.clear()
    rc = make_routed_case(t=9, e=3, r=4, seed=4)
    leaves = {k: rc[k].clone().requires_grad_(k != "weight") for k in ("x", "weight", "lora_a", "lora_b", "router")}
    y = routed_lora_mixture(leaves["x"], leaves["weight"], rc["bias"], leaves["lora_a"], leaves["lora_b"],
                            leaves["router"], 0.5, top_k=2, backend="triton")
    y.backward(rc["dy"])
    assert calls == {"check_mixture_args": 1, "check_router_args": 1, "resolve_backend": 1,
                     "check_supported": 1}, calls
