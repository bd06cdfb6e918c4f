"""Compiled routed-mixture kernels at model-sized shapes (CUDA only), against the float64 oracle.

    python -m pytest tests/test_router_gpu.py -q

Same oracle and tolerance budget as tests/test_router_triton.py (max|kernel - ref64| <=
2 * max|torch same dtype - ref64| + one ulp, else the fallback table), at SmolLM2-135M and
1.7B-class projection shapes and a 4096 x 4096 layer, bf16 and fp16, T up to 4096, E up to 64, r up
to 64, dense and top-k routing. Autotuning is set to its first config per shape
(MODECOTD_TRITON_TUNE=quick).

Top-k routing from 16-bit logits picks another expert than the float64 oracle on a few rows of a
large batch (near-ties rounded together): those rows are left out (``flipped_rows``) rather than let
into the torch path's error, which sets the budget; the mean error is checked as well as the maximum.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

# One config per kernel and shape (read when a kernel is first tuned): correctness does not need
# the autotuner's benchmark of 2-5 candidates, which would compile each of them.
os.environ.setdefault("MODECOTD_TRITON_TUNE", "quick")

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_triton import assert_budget  # noqa: E402
from test_router_triton import GRADS, SCALE, make_case, run  # noqa: E402

pytestmark = pytest.mark.gpu


def _top_k_mask(z: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, E) bool: the k largest logits of each row (torch.topk)."""
    return torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(top_k, dim=-1).indices, True)


def flipped_rows(case, top_k: int) -> torch.Tensor:
    """(T,) bool: rows whose top-k set differs from the float64 oracle's in the kernel or in the torch path.

    16-bit logits tie where float64 ones do not: the torch path rounds its logits to bf16/fp16 before
    picking the top k, so on a few rows of a large batch it routes to another expert than the oracle,
    and its error there is that of a different mixture, not of rounding. Counted into the budget
    (twice the torch path's error), such rows would let almost anything pass. The kernel picks from
    fp32 logits: it may differ from float64 only where two logits are nearly equal.
    """
    e = case["router"].shape[0]
    if not 0 < top_k < e:
        return torch.zeros(case["x"].shape[0], dtype=torch.bool, device=case["x"].device)
    from modecotd_engine.kernels.triton_router import routed_lora_mixture_fwd

    x, a, rt = case["x"], case["lora_a"], case["router"]
    z64 = x.double() @ rt.double().t()
    want = _top_k_mask(z64, top_k)
    with torch.no_grad():
        _, gates = routed_lora_mixture_fwd(x, case["weight"], case["bias"], a, case["lora_b"], rt, SCALE, top_k,
                                           "output")
        # the torch path's logits exactly as RoutedLoraMixtureFunction computes them (one GEMM with A_cat)
        dt = x.dtype
        er = a.shape[0] * a.shape[1]
        a_r = torch.cat([a.to(dt).reshape(er, a.shape[2]), rt.to(dt)])
        z16 = (x @ a_r.t())[:, er:].float()
    kernel = (gates[:, :e] != 0) != want
    # the kernel's choice differs from float64 only at near-ties of the k-th and (k+1)-th logit
    top2 = z64.topk(top_k + 1, dim=-1).values
    margin = (top2[:, -2] - top2[:, -1]).abs()
    bad = kernel.any(-1) & (margin > 1e-3 * z64.abs().amax(-1).clamp_min(1.0))
    assert not bad.any(), f"kernel top-{top_k} differs from float64 on {int(bad.sum())} rows that are no tie"
    return kernel.any(-1) | (_top_k_mask(z16, top_k) != want).any(-1)


def assert_mean_error(name, got, ref, torch_got):
    """mean|got - ref64| <= 2 * mean|torch same dtype - ref64| + one ulp at the output's scale."""
    if ref.numel() == 0:
        return
    err = (got.double() - ref).abs().mean().item()
    torch_err = (torch_got.double() - ref).abs().mean().item()
    eps = torch.finfo(got.dtype).eps * max(ref.abs().max().item(), 1e-30)
    assert err <= 2.0 * torch_err + eps, (
        f"{name} ({got.dtype}): mean err {err:.3e} over 2 x torch mean err {torch_err:.3e} + eps {eps:.1e}")


def check_against_oracle(case, top_k, mode, grads=GRADS):
    """tests/test_router_triton.py's check (max error within the budget, else the fallback table), on the
    rows both implementations route as the float64 oracle does (``flipped_rows`` get dy = 0, so they
    add nothing to any gradient, and their outputs are left out), plus the same budget on the mean
    error."""
    flipped = flipped_rows(case, top_k)
    assert flipped.float().mean().item() <= 0.05, f"{int(flipped.sum())} of {flipped.numel()} rows flipped"
    case = dict(case, dy=case["dy"].masked_fill(flipped[:, None], 0.0))
    keep = ~flipped
    ref = run(case, "oracle", top_k, mode, grads, double=True)
    tor = run(case, "torch", top_k, mode, grads)
    tri = run(case, "triton", top_k, mode, grads)
    for key in ref:
        assert tri[key] is not None, f"{key}: no gradient"
        assert tri[key].dtype == tor[key].dtype, f"{key}: dtype {tri[key].dtype} != {tor[key].dtype}"
        got, want, torch_got = tri[key], ref[key], tor[key]
        if key == "y":
            got, want, torch_got = got[keep], want[keep], torch_got[keep]
        assert_budget(key, got, want, torch_got)
        assert_mean_error(key, got, want, torch_got)
    return tri

# (K, N, E, r, T, top_k, mode): q/v-sized and MLP-sized layers; prefill/training (T=4096), small
# batches, decode (T=1, 16); E=64 is the kernels' limit (Z_PAD=64 router columns).
CASES = [
    (576, 576, 10, 16, 4096, 2, "output"),
    (576, 1536, 10, 16, 333, 0, "weight"),
    (576, 576, 32, 64, 1, 1, "output"),
    (1536, 576, 4, 8, 16, 0, "weight"),
    (2048, 2048, 32, 16, 4096, 2, "output"),
    (2048, 2048, 64, 8, 1024, 4, "weight"),
    (2048, 8192, 10, 16, 256, 10, "output"),
    (4096, 4096, 10, 16, 4096, 2, "weight"),
    (4096, 4096, 10, 16, 16, 2, "output"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,n,e,r,t,top_k,mode", CASES)
def test_model_shapes_match_oracle(k, n, e, r, t, top_k, mode, dtype):
    case = make_case(t=t, k=k, n=n, e=e, r=r, dtype=dtype, seed=k + n + t + e)
    check_against_oracle(case, top_k, mode)


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_fp32_experts_and_router_with_bf16_activations(mode):
    case = make_case(t=1000, k=576, n=1536, e=10, r=16, dtype=torch.bfloat16, lora_dtype=torch.float32,
                     router_dtype=torch.float32, seed=1)
    out = check_against_oracle(case, 2, mode)
    assert out["dlora_a"].dtype == torch.float32 and out["drouter"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_fp32_experts_and_router_at_decode(mode):
    case = make_case(t=8, k=4096, n=4096, e=10, r=16, dtype=torch.bfloat16, lora_dtype=torch.float32,
                     router_dtype=torch.float32, seed=5)
    out = check_against_oracle(case, 2, mode)
    assert out["y"].dtype == torch.bfloat16
    assert out["dlora_a"].dtype == out["dlora_b"].dtype == out["drouter"].dtype == torch.float32


@pytest.mark.skipif(torch.backends.cuda.matmul.allow_tf32, reason="TF32 matmuls are enabled globally")
def test_fp32_ieee_matches_torch_precision():
    # fp32 without TF32 (torch's default) must be as accurate as torch's fp32 matmul
    case = make_case(t=333, k=576, n=576, e=8, r=16, dtype=torch.float32, seed=2)
    check_against_oracle(case, 2, "weight")


def test_auto_backend_takes_triton_on_cuda():
    from modecotd_engine.kernels.router import routed_lora_mixture

    case = make_case(t=64, k=576, n=576, e=4, r=8, dtype=torch.bfloat16, seed=3)
    x = case["x"].clone().requires_grad_(True)
    y = routed_lora_mixture(x, case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["router"],
                            2.0, top_k=2)
    assert y.grad_fn.name() == "RoutedLoraMixtureTritonBackward"
