"""The routed mixture (learned per-token router): forward and every gradient against a float64
autograd-of-a-loop oracle, gradcheck, the one-GEMM shrink, and the router in the injection layer."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from conftest import make_random_bank

from modecotd_engine.engine.inject import inject_experts
from modecotd_engine.kernels import BackendUnavailableError, lora_mixture_loop
from modecotd_engine.kernels.router import (RoutedLoraMixtureFunction, routed_lora_mixture,
                                            routed_lora_mixture_reference, routing_gates)


def make_inputs(lead, k=13, n=11, e=5, r=3, has_bias=True, seed=0, router_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64) if has_bias else None
    a = torch.randn(e, r, k, generator=gen, dtype=torch.float64)
    bb = torch.randn(e, n, r, generator=gen, dtype=torch.float64)
    router = torch.randn(e, k, generator=gen, dtype=torch.float64) * router_scale
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    return x, w, b, a, bb, router, dy


def loop_oracle(x, w, b, a, bb, router, scale, top_k, mode):
    """Router gates written per token and per expert, then the per-expert loop: obviously right."""
    e = router.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(x2.shape[0]):
        z = torch.stack([x2[t] @ router[j] for j in range(e)])
        kept = sorted(range(e), key=lambda j: -float(z[j].detach()))[: (top_k or e)]
        ez = {j: torch.exp(z[j] - z[kept].max()) for j in kept}
        total = sum(ez.values())
        rows.append(torch.stack([ez[j] / total if j in ez else z[j] * 0 for j in range(e)]))
    gates = torch.stack(rows).reshape(*x.shape[:-1], e)
    return lora_mixture_loop(x, w, b, a, bb, gates, scale, mode)


def run_with_grads(fn, x, w, b, a, bb, router, dy, *args):
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bb, router)]
    y = fn(leaves[0], w, b, leaves[1], leaves[2], leaves[3], *args)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("top_k", [0, 1, 2, 5])
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 5)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_forward_and_every_gradient_match_loop_oracle(mode, top_k, lead, has_bias):
    inputs = make_inputs(lead, has_bias=has_bias, seed=zlib.crc32(repr((mode, top_k, lead, has_bias)).encode()))
    dy = inputs[-1]
    want = run_with_grads(loop_oracle, *inputs, 0.75, top_k, mode)
    for name, fn in (("reference", routed_lora_mixture_reference),
                     ("grouped", lambda *t: routed_lora_mixture(*t[:7], top_k=t[7], mode=t[8], backend="torch"))):
        got = run_with_grads(fn, *inputs[:-1], dy, 0.75, top_k, mode)
        for label, g, wnt in zip(["y", "dx", "dA", "dB", "d_router"], got, want):
            err = (g - wnt).abs()
            assert err.max() <= 1e-10 * (1 + wnt.abs().max()), (
                f"{name} {label}: max err {err.max():.3e}, mean {err.mean():.3e}")


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("top_k", [0, 2])
def test_gradcheck(mode, top_k):
    x, w, b, a, bb, router, _ = make_inputs((2, 3), k=5, n=6, e=4, r=2, seed=3)
    leaves = tuple(t.clone().requires_grad_(True) for t in (x, a, bb, router))
    fn = lambda *t: routed_lora_mixture(t[0], w, b, t[1], t[2], t[3], 0.5, top_k=top_k, mode=mode, backend="torch")  # noqa: E731
    # top-k is piecewise: gradcheck's finite differences must not flip the selection, which holds
    # for random logits (gaps >> the 1e-6 perturbation); the test is deterministic in its seed.
    assert torch.autograd.gradcheck(fn, leaves)


def test_float32_matches_float64_oracle_within_dtype_budget():
    """Same values in fp32: error against the fp64 oracle within 2x what the fp32 oracle itself makes."""
    x, w, b, a, bb, router, dy = make_inputs((9, 4), k=24, n=20, e=6, r=4, seed=5)
    want = run_with_grads(routed_lora_mixture_reference, x, w, b, a, bb, router, dy, 0.5, 2, "weight")
    f32 = [t.float() for t in (x, w, b, a, bb, router, dy)]
    ours = run_with_grads(lambda *t: routed_lora_mixture(*t[:7], top_k=t[7], mode=t[8]), *f32[:-1], f32[-1],
                          0.5, 2, "weight")
    same_dtype = run_with_grads(routed_lora_mixture_reference, *f32[:-1], f32[-1], 0.5, 2, "weight")
    for label, o, s, wnt in zip(["y", "dx", "dA", "dB", "d_router"], ours, same_dtype, want):
        budget = 2 * (s.double() - wnt).abs().max() + 1e-5
        err = (o.double() - wnt).abs()
        assert err.max() <= budget, f"{label}: max err {err.max():.3e} (budget {budget:.3e}), mean {err.mean():.3e}"


def test_one_shrink_gemm_against_a_cat_and_router(monkeypatch):
    """Forward: the only (T, K) x (K, .) product besides the base GEMM is against [A_cat; R]."""
    x, w, b, a, bb, router, _ = make_inputs((6,), k=7, n=5, e=3, r=2, seed=1)
    shapes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(self, other):
        if self.dim() == 2 and self.shape == (6, 7):
            shapes.append(tuple(other.shape))
        return real_matmul(self, other)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    routed_lora_mixture(x, w, b, a, bb, router, 1.0, backend="torch")
    monkeypatch.undo()
    assert shapes == [(7, 3 * 2 + 3)]


def test_gates_rows_sum_to_one_and_top_k_sparsity():
    x = torch.randn(4, 6, 9)
    router = torch.randn(5, 9)
    dense = routing_gates(x, router)
    torch.testing.assert_close(dense.sum(-1), torch.ones(4, 6))
    assert bool((dense > 0).all())
    sparse = routing_gates(x, router, top_k=2)
    assert bool(((sparse > 0).sum(-1) == 2).all())
    torch.testing.assert_close(sparse.sum(-1), torch.ones(4, 6))
    # the kept experts are the two largest logits
    top = (x @ router.t()).topk(2, -1).indices
    assert bool((sparse.gather(-1, top) > 0).all())


def test_errors():
    x, w, b, a, bb, router, _ = make_inputs((3,), seed=2)
    with pytest.raises(ValueError, match=r"router must be \(E=5, K=13\)"):
        routed_lora_mixture(x, w, b, a, bb, router[:4], 1.0)
    with pytest.raises(ValueError, match="top_k must be an int in 0..E=5"):
        routed_lora_mixture(x, w, b, a, bb, router, 1.0, top_k=6)
    with pytest.raises(ValueError, match="lora_b must be"):
        routed_lora_mixture(x, w, b, a, bb[:, :4], router, 1.0)
    # make_inputs gives float64 tensors: the Triton kernels take fp16/bf16/fp32 only
    assert x.dtype == torch.float64
    with pytest.raises(BackendUnavailableError, match="x has dtype torch.float64, for which the routed mixture has no Triton"):
        routed_lora_mixture(x, w, b, a, bb, router, 1.0, backend="triton")


def test_function_saves_no_expert_activations():
    """Saved tensors: inputs and the (T, E) gates only; H (T, E*r) is recomputed in backward."""
    x, w, b, a, bb, router, _ = make_inputs((10,), seed=4)
    y = RoutedLoraMixtureFunction.apply(x, w, b, a.requires_grad_(), bb, router, 1.0, 0, "output")
    saved = y.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(10, 13), (11, 13), (5, 3, 13), (5, 11, 3), (5, 13), (10, 5)]


# ---------------------------------------------------------------------------------- injection
def random_bank(model, names=("a", "b", "c"), seed=0):
    return make_random_bank(model, names, seed=seed, b_std=0.2)


def ids(batch=2, length=9, seed=0):
    return torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_router_in_model_equals_per_token_gates_computed_outside(base_model, mode):
    """A layer with a router gives what the shared per-token gates give when set to its routing."""
    model = copy.deepcopy(base_model)
    bank = random_bank(model)
    handle = inject_experts(model, bank, mode=mode)
    handle.attach_router(top_k=2, seed=1, init_std=3.0)
    captured = {}

    def grab(name):
        def hook(mod, args, out):
            captured[name] = (args[0].detach(), out.detach())
        return hook

    hooks = [layer.register_forward_hook(grab(n)) for n, layer in handle.layers.items()]
    handle.set_gates(torch.zeros(2, 3))  # ignored while a router is attached
    model(ids())
    for h in hooks:
        h.remove()
    for name, layer in handle.layers.items():
        x, y_routed = captured[name]
        g = routing_gates(x, layer.router, top_k=2)
        assert bool(((g > 0).sum(-1) == 2).all())
        from modecotd_engine.kernels import lora_mixture
        want = lora_mixture(x, layer.base.weight, layer.base.bias, layer.lora_a, layer.lora_b, g, layer.scale,
                            mode=mode, backend="torch")
        torch.testing.assert_close(y_routed, want, rtol=1e-5, atol=1e-6)


def test_attach_detach_state_roundtrip_and_training(base_model):
    model = copy.deepcopy(base_model)
    bank = random_bank(model)
    handle = inject_experts(model, bank)
    want_plain = model(ids()).logits
    params = handle.attach_router(trainable=True, seed=0)
    assert len(params) == len(bank.modules) and all(p.requires_grad and p.shape[0] == 3 for p in params)
    assert handle.has_router and "router top_k=0" in repr(model)
    routed = model(ids()).logits
    routed.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in handle.lora_parameters())  # experts stay frozen
    state = handle.router_state()
    assert set(state) == set(bank.modules)
    handle.detach_router()
    assert not handle.has_router and handle.router_state() == {}
    torch.testing.assert_close(model(ids()).logits, want_plain)
    handle.attach_router(state)
    torch.testing.assert_close(model(ids()).logits, routed.detach())


def test_attach_router_errors(base_model):
    model = copy.deepcopy(base_model)
    handle = inject_experts(model, random_bank(model))
    with pytest.raises(ValueError, match="top_k must be an int in 0..3"):
        handle.attach_router(top_k=4)
    state = {n: torch.zeros(3, 64) for n in handle.layers}
    first = next(iter(state))
    with pytest.raises(ValueError, match="missing modules"):
        handle.attach_router({k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match=rf"router for module {first} must be"):
        handle.attach_router({**state, first: torch.zeros(2, 64)})
    assert not handle.has_router
