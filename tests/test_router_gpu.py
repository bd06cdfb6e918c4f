"""Compiled routed-mixture kernels at model-sized shapes (CUDA only), against the float64 oracle.

    python -m pytest tests/test_router_gpu.py -q

Same oracle and tolerance budget as tests/test_router_triton.py (max|kernel - ref64| <=
2 * max|torch same dtype - ref64| + one ulp, else the fallback table), at SmolLM2-135M and
1.7B-class projection shapes, bf16 and fp16, T up to 4096, E up to 64, r up to 64, dense and
top-k routing. Autotuning is set to its first config per shape (MODECOTD_TRITON_TUNE=quick).
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
from test_router_triton import check_against_oracle, make_case  # noqa: E402

pytestmark = pytest.mark.gpu

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
