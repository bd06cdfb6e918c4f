"""Compiled Triton kernels at model-sized shapes (CUDA only), against the float64 oracle.

    python -m pytest tests/test_kernels_gpu.py -q

Same oracle and tolerance budget as tests/test_kernels_triton.py (max|kernel - ref64| <=
2 * max|torch same dtype - ref64| + one ulp, else the fallback table), at SmolLM2-135M and
1.7B-class projection shapes and the kernel benchmark's 4096 x 4096 layer, bf16 and fp16, T up to
4096 (and decode, where the forward shrink splits K), E up to 32, r up to 64, fp32 experts next to
bf16 activations. Autotuning is set to its first config per shape (MODECOTD_TRITON_TUNE=quick) except
where a test checks tuning; every config of the tables is checked under the interpreter
(tests/test_kernel_configs_interpret.py).
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
from test_kernels_triton import check_against_oracle, make_case  # noqa: E402

pytestmark = pytest.mark.gpu

# (K, N, E, r, T, gate pattern, mode, gates require grad)
CASES = [
    (576, 576, 10, 16, 4096, "one_hot_grouped", "output", False),
    (576, 576, 10, 16, 4096, "one_hot_grouped", "output", True),
    (576, 1536, 10, 16, 333, "dense_softmax", "output", True),
    (576, 576, 32, 64, 1, "one_hot_distinct", "output", True),
    (576, 1536, 10, 16, 4096, "zipf", "weight", True),
    (2048, 2048, 32, 64, 4096, "top2", "output", True),
    (2048, 2048, 4, 8, 16, "dense_softmax", "weight", True),
    (2048, 2048, 10, 16, 1024, "one_hot_padded", "output", False),
    (2048, 8192, 10, 16, 256, "dense_softmax", "output", True),
    # the kernel benchmark's target layer (7B attention, E=10, r=16): training batch in both modes ...
    (4096, 4096, 10, 16, 4096, "dense_softmax", "output", True),
    (4096, 4096, 10, 16, 4096, "one_hot_grouped", "weight", False),
    # ... and output-mode decode, where the forward shrink splits K=4096 over 4 programs (fp32 partials)
    (4096, 4096, 10, 16, 16, "dense_softmax", "output", True),
    (2048, 2048, 10, 16, 1, "top2", "output", False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,n,e,r,t,pattern,mode,gate_grad", CASES)
def test_model_shapes_match_oracle(k, n, e, r, t, pattern, mode, gate_grad, dtype):
    case = make_case(t=t, k=k, n=n, e=e, r=r, dtype=dtype, pattern=pattern, seed=k + n + t)
    grads = ("x", "lora_a", "lora_b", "gates") if gate_grad else ("x", "lora_a", "lora_b")
    check_against_oracle(case, mode, grads=grads)


def test_fp32_experts_with_bf16_activations():
    case = make_case(t=1000, k=576, n=1536, e=10, r=16, dtype=torch.bfloat16,
                     lora_dtype=torch.float32, gate_dtype=torch.float32, pattern="dense_softmax")
    out = check_against_oracle(case, "output")
    assert out["dlora_a"].dtype == torch.float32 and out["dgates"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_fp32_experts_at_decode(mode):
    # decode with fp32 factors next to bf16 activations: split-K shrink partials, the decode tiles'
    # shared-memory fit at fp32 (the pruner's 2-stage fallback), every gradient in its own dtype
    case = make_case(t=8, k=4096, n=4096, e=10, r=16, dtype=torch.bfloat16, lora_dtype=torch.float32,
                     gate_dtype=torch.float32, pattern="dense_softmax", seed=17)
    out = check_against_oracle(case, mode)
    assert out["y"].dtype == torch.bfloat16
    assert out["dlora_a"].dtype == out["dlora_b"].dtype == out["dgates"].dtype == torch.float32


@pytest.mark.skipif(torch.backends.cuda.matmul.allow_tf32, reason="TF32 matmuls are enabled globally")
def test_fp32_ieee_matches_torch_precision():
    # fp32 without TF32 (torch's default) must be as accurate as torch's fp32 matmul
    case = make_case(t=333, k=576, n=576, e=4, r=16, dtype=torch.float32, pattern="top2")
    check_against_oracle(case, "weight")


def test_decode_and_prefill_get_different_tiles(monkeypatch):
    # full tuning here, on shapes no other test uses (the autotuner caches per shape)
    monkeypatch.setenv("MODECOTD_TRITON_TUNE", "full")
    from modecotd_engine.kernels import lora_mixture
    from modecotd_engine.kernels.triton_fused_gemm import _lora_fused_gemm_kernel

    chosen = {}
    for t in (8, 4096):
        case = make_case(t=t, k=2048, n=2048, e=10, r=16, dtype=torch.bfloat16, pattern="dense_softmax")
        with torch.no_grad():
            lora_mixture(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                         case["gates"], 2.0, "output", backend="triton")
        chosen[t] = _lora_fused_gemm_kernel.best_config.kwargs["BLOCK_M"]
    assert chosen[8] == 16 and chosen[4096] >= 64, chosen
