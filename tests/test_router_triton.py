"""Triton backend of ``routed_lora_mixture`` (learned per-token router) against the float64 oracle.

On CPU these run Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any kernel
module is imported); on a CUDA machine the same tests run the compiled kernels. Every case checks
the forward and dX, dA, dB, dR for one random dy against ``routed_lora_mixture_reference`` in
float64, within the data-derived budget of tests/test_kernels_triton.py: at most twice the error
of the grouped torch path computing in the same dtype, plus one ulp at the output's scale.

Inputs are random, so no two router logits of a row tie exactly; the tie rule itself (the lower
expert index is kept) is checked on purpose-built ties.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before import",
                allow_module_level=True)
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_triton import assert_budget  # noqa: E402

from modecotd_engine.kernels import BackendUnavailableError  # noqa: E402
from modecotd_engine.kernels.router import (RoutedLoraMixtureFunction, routed_lora_mixture,  # noqa: E402
                                            routed_lora_mixture_reference, routing_gates)

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
SCALE = 0.75
GRADS = ("x", "lora_a", "lora_b", "router")
LEAVES = ("x", "weight", "bias", "lora_a", "lora_b", "router")


def make_case(t=133, k=37, n=45, e=3, r=4, dtype=torch.float32, bias=True, lora_dtype=None,
              router_dtype=None, seed=0, lead=None):
    """Leaf tensors made in their target dtypes; the oracle gets ``.double()`` of the same values.
    Router rows ~ N(0, 1/K) give logits of unit scale: softmax gates far from one-hot, no ties."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead is not None else (t,)

    def rnd(*size, std=1.0, dt=dtype):
        return (torch.randn(*size, generator=gen) * std).to(dt).to(DEVICE)

    return {
        "x": rnd(*shape, k),
        "weight": rnd(n, k, std=k ** -0.5),
        "bias": rnd(n) if bias else None,
        "lora_a": rnd(e, r, k, std=k ** -0.5, dt=lora_dtype or dtype),
        "lora_b": rnd(e, n, r, dt=lora_dtype or dtype),
        "router": rnd(e, k, std=k ** -0.5, dt=router_dtype or dtype),
        "dy": rnd(*shape, n),
    }


def run(case, backend, top_k, mode, grads=GRADS, double=False, prep=None):
    """Forward + backward with ``case['dy']``; returns {"y": ..., "dx": ..., "drouter": ...}."""
    leaves = {}
    for name in LEAVES:
        t = case[name]
        if t is not None:
            t = t.detach().clone()
            t = (t.double() if double else t).requires_grad_(name in grads)
        leaves[name] = t
    args = prep(dict(leaves)) if prep is not None else leaves
    ordered = [args[name] for name in LEAVES]
    if backend == "oracle":
        y = routed_lora_mixture_reference(*ordered, SCALE, top_k, mode)
    else:
        y = routed_lora_mixture(*ordered, SCALE, top_k=top_k, mode=mode, backend=backend)
    y.backward(case["dy"].double() if double else case["dy"])
    out = {"y": y.detach()}
    for name in grads:
        out["d" + name] = leaves[name].grad
    return out


def check_against_oracle(case, top_k, mode, grads=GRADS, prep=None):
    ref = run(case, "oracle", top_k, mode, grads, double=True, prep=prep)
    tor = run(case, "torch", top_k, mode, grads, prep=prep)
    tri = run(case, "triton", top_k, mode, grads, prep=prep)
    for key in ref:
        assert tri[key] is not None, f"{key}: no gradient"
        assert tri[key].dtype == tor[key].dtype, f"{key}: dtype {tri[key].dtype} != {tor[key].dtype}"
        assert_budget(key, tri[key], ref[key], tor[key])
    return tri


# ---------------------------------------------------------------------------------------------
# forward and every gradient against the oracle
# ---------------------------------------------------------------------------------------------

# (E, r, T, bias): E=3 r=4 puts the experts in two groups of the interpreter's tiling and T=133
# spans nine row tiles; E=10 r=1 pads a rank-1 layer and needs 10 router blocks of width 1; E=10
# r=16 fills the 16-wide rank tile and puts its router columns in one block; T=1 and 7 are decode.
SHAPES = [(3, 4, 133, True), (10, 1, 7, False), (10, 16, 1, True), (10, 16, 133, False)]


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("top_k", ["0", "1", "2", "E"])
@pytest.mark.parametrize("e,r,t,bias", SHAPES)
def test_forward_and_every_gradient_match_oracle(e, r, t, bias, top_k, mode):
    k = e if top_k == "E" else int(top_k)
    case = make_case(t=t, e=e, r=r, bias=bias, seed=100 * e + 10 * r + t + k)
    check_against_oracle(case, k, mode)


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("r,t,top_k", [(16, 133, 0), (1, 7, 1)])
def test_single_expert(r, t, top_k, mode):
    # E=1: every gate is 1, dR is exactly zero (softmax of one logit is constant)
    case = make_case(t=t, e=1, r=r, seed=200 + r + t)
    out = check_against_oracle(case, top_k, mode)
    assert bool((out["drouter"] == 0).all())


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_router_concentrated_on_one_expert(mode):
    # x carries a shared direction that router row 1 picks out: with top_k=1 whole row tiles route
    # to expert 1 alone, the fused GEMM's single-expert path, and dropped experts must get no dA/dB.
    case = make_case(t=133, e=4, r=4, seed=300)
    u = torch.randn(case["x"].shape[-1], generator=torch.Generator().manual_seed(301)).to(DEVICE)
    u = u / u.norm()
    case["x"] = case["x"] + 6.0 * u
    case["router"] = case["router"].clone()
    case["router"][1] += u
    g = routing_gates(case["x"], case["router"], top_k=1)
    assert g[:, 1].sum() > 0.8 * g.shape[0]
    out = check_against_oracle(case, 1, mode)
    unused = (g != 0).sum(0) == 0
    assert bool((out["dlora_a"][unused] == 0).all()) and bool((out["dlora_b"][unused] == 0).all())


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("top_k", [0, 2])
def test_half_precision(top_k, mode):
    dtype = torch.bfloat16 if ON_CUDA else torch.float16
    case = make_case(t=133, e=10, r=4, dtype=dtype, seed=400 + top_k)
    check_against_oracle(case, top_k, mode)


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_fp32_experts_and_router_with_half_activations(mode):
    # fp32 LoRA and router weights next to 16-bit activations; each gradient in its input's dtype
    half = torch.bfloat16 if ON_CUDA else torch.float16
    case = make_case(t=41, e=3, r=4, dtype=half, lora_dtype=torch.float32, router_dtype=torch.float32,
                     seed=500)
    out = check_against_oracle(case, 2, mode)
    assert out["y"].dtype == half and out["dx"].dtype == half
    assert out["dlora_a"].dtype == out["dlora_b"].dtype == out["drouter"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("grads", [("router",), ("x",), ("lora_a",), ("lora_b",)])
def test_partial_gradients(grads, mode):
    # each subset takes a different set of buffers: dZ without dH, dH without H~, H~ alone ...
    case = make_case(t=41, e=3, r=4, seed=600)
    check_against_oracle(case, 2, mode, grads=grads)


def test_leading_dims_and_non_contiguous_inputs():
    case = make_case(lead=(3, 11), e=3, r=4, seed=700)

    def prep(a):
        # same values, strided layouts: x a column slice, W transposed in memory, A/B permuted,
        # the router a column slice of a wider matrix
        a = dict(a)
        x = a["x"]
        a["x"] = torch.cat([x, torch.zeros_like(x[..., :5])], dim=-1)[..., : x.shape[-1]]
        a["weight"] = a["weight"].t().contiguous().t()
        a["lora_a"] = a["lora_a"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
        a["lora_b"] = a["lora_b"].permute(0, 2, 1).contiguous().permute(0, 2, 1)
        rt = a["router"]
        a["router"] = torch.cat([rt, torch.zeros_like(rt)], dim=-1)[:, : rt.shape[-1]]
        return a

    out = check_against_oracle(case, 2, "weight", prep=prep)
    assert out["y"].shape == (3, 11, case["weight"].shape[0]) and out["dx"].shape == case["x"].shape


def test_frozen_weight_grads_when_requested():
    case = make_case(t=41, e=3, r=4, seed=800)
    check_against_oracle(case, 0, "output", grads=("x", "weight", "bias", "router"))


# ---------------------------------------------------------------------------------------------
# gates, ties, edge cases, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 3])
def test_gate_buffer_matches_float64_routing(top_k):
    from modecotd_engine.kernels.triton_router import routed_lora_mixture_fwd, router_blocks

    case = make_case(t=133, e=10, r=4, seed=900)
    x, a, rt = case["x"], case["lora_a"], case["router"]
    _, gates = routed_lora_mixture_fwd(x, case["weight"], None, a, case["lora_b"], rt, SCALE, top_k, "output")
    assert gates.shape == (133, 10 + router_blocks(10, 4)) and gates.dtype == torch.float32
    want = routing_gates(x.double(), rt.double(), top_k)
    err = (gates[:, :10].double() - want).abs().max().item()
    assert err <= 1e-6, f"gates: max err {err:.3e}"
    assert bool((gates[:, 10:] == 1).all())  # the router blocks' mask columns
    if top_k:
        assert bool(((gates[:, :10] != 0).sum(-1) == top_k).all())


def test_exact_ties_keep_the_lower_expert_index():
    from modecotd_engine.kernels.triton_router import routed_lora_mixture_fwd

    case = make_case(t=16, e=5, r=4, seed=1000)
    rt = case["router"].clone()
    m = case["x"].mean(0)
    rt[1] += 10.0 * m / m.norm() ** 2  # expert 1 leads most rows ...
    rt[3] = rt[1]  # ... tied with expert 3 everywhere
    _, gates = routed_lora_mixture_fwd(case["x"], case["weight"], None, case["lora_a"], case["lora_b"], rt,
                                       SCALE, 1, "output")
    z = case["x"] @ rt.t()
    assert torch.equal(z[:, 1], z[:, 3])
    tied_top = z[:, 1] >= z.max(-1).values  # rows where 1 and 3 share the maximum
    assert tied_top.sum() >= 8
    assert bool((gates[tied_top, 1] == 1).all()) and bool((gates[tied_top, 3] == 0).all())


def test_no_grad_inference_and_empty_batch():
    case = make_case(t=41, e=3, r=4, seed=1100)
    args = [case[name] for name in LEAVES]
    with torch.no_grad():
        y = routed_lora_mixture(*args, SCALE, top_k=2, backend="triton")
        ref = routed_lora_mixture_reference(*(t.double() for t in args), SCALE, 2)
        tor = routed_lora_mixture(*args, SCALE, top_k=2, backend="torch")
    assert_budget("y", y, ref, tor)
    x = case["x"][:0].clone().requires_grad_(True)
    rt = case["router"].clone().requires_grad_(True)
    y = routed_lora_mixture(x, case["weight"], None, case["lora_a"], case["lora_b"], rt, SCALE, mode="weight",
                            backend="triton")
    assert y.shape == (0, case["weight"].shape[0])
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(rt.grad, torch.zeros_like(rt))


@pytest.mark.parametrize("k,n", [(7, 0), (0, 6)])
def test_empty_reduction_or_output_axis(k, n):
    # N = 0: no output, every gradient zero; K = 0: logits 0, uniform gates, y = b + nothing else
    gen = torch.Generator().manual_seed(1150)
    leaves = {"x": torch.randn(5, k, generator=gen), "lora_a": torch.randn(3, 2, k, generator=gen),
              "lora_b": torch.randn(3, n, 2, generator=gen), "router": torch.randn(3, k, generator=gen)}
    weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    got = {}
    for backend in ("triton", "oracle"):
        ts = {name: t.clone().to(DEVICE).requires_grad_(True) for name, t in leaves.items()}
        args = (ts["x"], weight.to(DEVICE), bias.to(DEVICE), ts["lora_a"], ts["lora_b"], ts["router"], SCALE)
        y = (routed_lora_mixture(*args, top_k=2, backend=backend) if backend == "triton"
             else routed_lora_mixture_reference(*args, top_k=2))
        y.sum().backward()
        got[backend] = [y.detach()] + [ts[name].grad for name in leaves]
    for label, a, b in zip(("y", "dx", "dA", "dB", "dR"), got["triton"], got["oracle"]):
        assert torch.equal(a, b), label  # exact: sums over an empty axis or of zeros


def test_backend_choice_and_errors(monkeypatch):
    case = make_case(t=4, e=3, r=4, seed=1200)
    args = [case[name] for name in LEAVES]
    if not ON_CUDA:
        # auto on CPU: the grouped torch path
        y = routed_lora_mixture(*(t.clone().requires_grad_(True) for t in args), SCALE)
        assert y.grad_fn.name() == RoutedLoraMixtureFunction.__name__ + "Backward"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
            routed_lora_mixture(*args, SCALE, backend="triton")
        monkeypatch.undo()
        half = [t.to(torch.bfloat16) for t in args]
        with pytest.raises(ValueError, match="interpreter"):
            routed_lora_mixture(*half, SCALE, backend="triton")
    with pytest.raises(BackendUnavailableError, match="router has dtype torch.float64"):
        routed_lora_mixture(*args[:5], args[5].double(), SCALE, backend="triton")
