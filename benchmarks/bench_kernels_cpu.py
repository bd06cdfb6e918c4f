"""CPU microbenchmarks of the gated multi-LoRA layer (pytest-benchmark; not part of the test run).

    pytest benchmarks/bench_kernels_cpu.py --benchmark-only

SmolLM2-135M projection shapes, T=256 tokens, E=10 experts of rank 16: the base GEMM (the floor),
the grouped torch path and the per-expert loop, forward and forward+backward, with one-hot
grouped (distillation) and dense (mixture) gates. The full sweep with JSON/markdown/PNG output is
``python benchmarks/run_kernels.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modecotd_engine.bench.kernels import SHAPES, SMOL, make_gates
from modecotd_engine.kernels import lora_mixture, lora_mixture_loop

T, E, R, SCALE = 256, 10, 16, 2.0


@pytest.fixture(scope="module", params=SMOL)
def layer(request):
    k, n = SHAPES[request.param]
    gen = torch.Generator().manual_seed(0)
    return {
        "name": request.param,
        "x": torch.randn(T, k, generator=gen),
        "w": torch.randn(n, k, generator=gen) * k ** -0.5,
        "b": torch.randn(n, generator=gen) * 0.1,
        "a": torch.randn(E, R, k, generator=gen) * k ** -0.5,
        "bb": torch.randn(E, n, R, generator=gen) * 0.02,
        "dy": torch.randn(T, n, generator=gen),
        "gates": {g: make_gates(g, T, E, gen) for g in ("one-hot-grouped", "dense")},
    }


def _op(provider, layer, gates, x, a, bb):
    w, b, g = layer["w"], layer["b"], layer["gates"][gates]
    if provider == "base":
        return F.linear(x, w, b)
    if provider == "loop":
        return lora_mixture_loop(x, w, b, a, bb, g, SCALE, "output")
    return lora_mixture(x, w, b, a, bb, g, SCALE, "output", backend="torch")


@pytest.mark.parametrize("gates", ["one-hot-grouped", "dense"])
@pytest.mark.parametrize("provider", ["base", "torch", "loop"])
def test_forward(benchmark, layer, provider, gates):
    benchmark.group = f"fwd {layer['name']} {gates}"

    def run():
        with torch.no_grad():
            return _op(provider, layer, gates, layer["x"], layer["a"], layer["bb"])

    y = benchmark(run)
    assert y.shape == (T, layer["w"].shape[0])


@pytest.mark.parametrize("gates", ["one-hot-grouped", "dense"])
@pytest.mark.parametrize("provider", ["base", "torch", "loop"])
def test_forward_backward(benchmark, layer, provider, gates):
    benchmark.group = f"fwd+bwd {layer['name']} {gates}"
    x = layer["x"].clone().requires_grad_(True)
    a = layer["a"].clone().requires_grad_(True)
    bb = layer["bb"].clone().requires_grad_(True)

    def run():
        x.grad = a.grad = bb.grad = None
        _op(provider, layer, gates, x, a, bb).backward(layer["dy"])

    benchmark(run)
    assert x.grad is not None and x.grad.shape == x.shape
