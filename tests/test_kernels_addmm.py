"""``backend="triton_addmm"`` (the frozen GEMM by torch, the expand by ``addmm``) against the float64 oracle.

The second design reuses the fused design's shrink, backward-shrink, weight-combine and token-reduce
kernels; these tests run it through the cases of tests/test_kernels_triton.py (its helpers, gate
patterns and budget): forward and dX, dA, dB, dG, both modes, fp32 and fp16 (bf16 too on CUDA).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_triton import (  # noqa: E402
    DTYPES,
    GRAD_NAMES,
    ON_CUDA,
    PATTERNS,
    SCALE,
    check_against_oracle,
    make_case,
)

from modecotd_engine.kernels import lora_mixture  # noqa: E402
from modecotd_engine.kernels.ops import BACKENDS, MIXTURE_BACKENDS, resolve_backend  # noqa: E402

BACKEND = "triton_addmm"


def check_addmm(case, mode="output", grads=GRAD_NAMES, prep=None):
    return check_against_oracle(case, mode, grads, prep, backend=BACKEND)


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gate_patterns_match_oracle(pattern, mode):
    case = make_case(pattern=pattern, bias=PATTERNS.index(pattern) % 2 == 0, seed=1)
    check_addmm(case, mode)


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("pattern", ["one_hot_grouped", "one_hot_padded", "zipf", "top2", "all_zero"])
def test_sparse_backward_without_gate_grad(pattern, mode):
    # without dG the kernels skip experts whose gates are zero in a tile: the buffers the dense
    # addmm reads must hold zeros there
    case = make_case(pattern=pattern, seed=2)
    check_addmm(case, mode, grads=("x", "lora_a", "lora_b"))


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("pattern", ["dense_softmax", "one_hot_distinct"])
def test_small_batches(t, pattern, mode):
    # K=70: the forward shrink splits K, and the expand sums the partials
    case = make_case(t=t, k=70, pattern=pattern, seed=3 + t)
    check_addmm(case, mode)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("pattern", ["dense_softmax", "one_hot_grouped", "top2"])
def test_half_precision(dtype, mode, pattern):
    case = make_case(dtype=dtype, pattern=pattern, seed=4)
    check_addmm(case, mode)


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_fp32_experts_with_half_activations(mode):
    half = torch.bfloat16 if ON_CUDA else torch.float16
    case = make_case(dtype=half, lora_dtype=torch.float32, gate_dtype=torch.float32, pattern="top2", seed=5)
    out = check_addmm(case, mode)
    assert out["y"].dtype == half and out["dx"].dtype == half
    assert out["dlora_a"].dtype == torch.float32 and out["dlora_b"].dtype == torch.float32
    assert out["dgates"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("grads", [("lora_b",), ("gates",), ("x",), ("lora_a", "gates")])
def test_partial_gradients(grads, mode):
    case = make_case(pattern="dense_softmax", seed=8)
    check_addmm(case, mode, grads=grads)


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_leading_dims_and_non_contiguous_inputs(mode):
    case = make_case(lead=(3, 11), pattern="top2", seed=7)

    def prep(a):
        a = dict(a)
        x = a["x"]
        a["x"] = torch.cat([x, torch.zeros_like(x[..., :5])], dim=-1)[..., : x.shape[-1]]
        a["weight"] = a["weight"].t().contiguous().t()
        a["lora_a"] = a["lora_a"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
        a["lora_b"] = a["lora_b"].permute(0, 2, 1).contiguous().permute(0, 2, 1)
        g = a["gates"]
        a["gates"] = torch.cat([g, torch.zeros_like(g)], dim=-1)[..., : g.shape[-1]]
        return a

    out = check_addmm(case, mode, prep=prep)
    assert out["y"].shape == (3, 11, case["weight"].shape[0])


@pytest.mark.parametrize("k,n,e,r", [(100, 130, 5, 20), (16, 16, 1, 1), (48, 70, 9, 3)])
def test_shapes(k, n, e, r):
    case = make_case(t=41, k=k, n=n, e=e, r=r, pattern="dense_softmax", seed=6)
    check_addmm(case, "weight" if e == 9 else "output")


def test_frozen_weight_grads_and_empty_batch():
    case = make_case(pattern="zipf", seed=9)
    check_addmm(case, "output", grads=("x", "weight", "bias", "lora_a"))
    x = case["x"][:0].clone().requires_grad_(True)
    a = case["lora_a"].clone().requires_grad_(True)
    y = lora_mixture(x, case["weight"], None, a, case["lora_b"], case["gates"][:0], SCALE, "weight",
                     backend=BACKEND)
    assert y.shape == (0, case["weight"].shape[0])
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(a.grad, torch.zeros_like(a))


def test_backend_name_is_the_mixture_ops_only():
    assert BACKEND in MIXTURE_BACKENDS and BACKEND not in BACKENDS  # auto and the routed op keep theirs
    dev = torch.device("cuda" if ON_CUDA else "cpu")
    assert resolve_backend(BACKEND, dev, backends=MIXTURE_BACKENDS) == BACKEND
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(BACKEND, dev)
    case = make_case(t=4, pattern="dense_softmax", seed=11)
    args = [case[k] for k in ("x", "weight", "bias", "lora_a", "lora_b")] + [case["gates"].double()]
    with pytest.raises(ValueError, match="gates has dtype torch.float64"):
        lora_mixture(*args, SCALE, "output", backend=BACKEND)
