"""The torch grouped path of lora_mixture against the per-expert loop oracle, in float64."""

from __future__ import annotations

import zlib

import pytest
import torch

from modecotd_engine.kernels import (BackendUnavailableError, lora_mixture, lora_mixture_loop,
                                     lora_mixture_torch)
from modecotd_engine.kernels.reference import SPARSE_MIN_ROWS, LoraMixtureTorchFunction, one_hot_rows


def make_gates(pattern: str, lead: tuple[int, ...], e: int, gen: torch.Generator) -> torch.Tensor:
    t = int(torch.tensor(lead).prod())
    if pattern == "dense":
        g = torch.softmax(torch.randn(t, e, generator=gen), -1)
    elif pattern == "onehot_distinct":
        g = torch.nn.functional.one_hot(torch.randint(0, e, (t,), generator=gen), e).double()
        g = g * (0.5 + torch.rand(t, 1, generator=gen))
    elif pattern == "onehot_grouped":
        idx = torch.sort(torch.randint(0, e, (t,), generator=gen)).values
        g = torch.nn.functional.one_hot(idx, e).double()
    elif pattern == "onehot_identical":
        g = torch.zeros(t, e)
        g[:, e - 1] = 1.0
    elif pattern == "zero":
        g = torch.zeros(t, e)
    elif pattern == "signed":  # mixing weights in [-3, 3], as the search method produces
        g = (torch.rand(t, e, generator=gen) * 6 - 3)
    else:
        raise ValueError(pattern)
    return g.double().reshape(*lead, e)


PATTERNS = ["dense", "onehot_distinct", "onehot_grouped", "onehot_identical", "zero", "signed"]


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 5)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_grouped_matches_loop_forward_and_grads(mode, pattern, lead, has_bias):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((mode, pattern, lead, has_bias)).encode()))
    k, n, e, r = 13, 11, 4, 3
    x = torch.randn(*lead, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64) if has_bias else None
    a = torch.randn(e, r, k, generator=gen, dtype=torch.float64)
    bb = torch.randn(e, n, r, generator=gen, dtype=torch.float64)
    g = make_gates(pattern, lead, e, gen)
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    outs = {}
    for name, fn in (("loop", lora_mixture_loop), ("grouped", lora_mixture_torch)):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, bb, g)]
        y = fn(leaves[0], w, b, leaves[1], leaves[2], leaves[3], 0.75, mode)
        y.backward(dy)
        outs[name] = [y] + [t.grad for t in leaves]
    for label, got, want in zip(["y", "dx", "da", "db", "dg"], outs["grouped"], outs["loop"]):
        err = (got - want).abs()
        assert err.max() <= 1e-10 * (1 + want.abs().max()), f"{label}: max err {err.max():.3e}, mean {err.mean():.3e}"


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_gradcheck(mode):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_mixture(t[0], w, b, *t[1:], 0.5, mode, "torch"), (x, a, bb, g))


def test_sparse_path_is_taken_for_one_hot_without_gate_grad(monkeypatch):
    """One-hot rows with no gate gradient run per active expert on its rows only, when that pays:
    one active expert at any size, several once there are SPARSE_MIN_ROWS rows."""
    calls = []
    original = LoraMixtureTorchFunction.forward

    def spy(ctx, *args):
        out = original(ctx, *args)
        calls.append(ctx.sparse)
        return out

    monkeypatch.setattr(LoraMixtureTorchFunction, "forward", staticmethod(spy))
    x = torch.randn(8, 5)
    w, a, bb = torch.randn(4, 5), torch.randn(3, 2, 5), torch.randn(3, 4, 2)
    g = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 2, 2, 1, 1, 0]), 3).float()
    single = torch.nn.functional.one_hot(torch.full((8,), 2), 3).float()
    lora_mixture(x, w, None, a, bb, single, 1.0, backend="torch")
    lora_mixture(x, w, None, a, bb, g, 1.0, backend="torch")
    big = torch.nn.functional.one_hot(torch.randint(0, 3, (SPARSE_MIN_ROWS,)), 3).float()
    lora_mixture(torch.randn(SPARSE_MIN_ROWS, 5), w, None, a, bb, big, 1.0, backend="torch")
    lora_mixture(x, w, None, a, bb, single.requires_grad_(True), 1.0, backend="torch")
    lora_mixture(x, w, None, a, bb, torch.full((8, 3), 0.3), 1.0, backend="torch")
    assert calls == [True, False, True, False, False]


@pytest.mark.parametrize("pattern", ["onehot_distinct", "onehot_grouped", "onehot_identical"])
def test_sparse_path_with_many_rows_matches_loop(pattern):
    """The per-expert path over several experts' rows (index_select / index_add) against the oracle."""
    gen = torch.Generator().manual_seed(7)
    t, k, n, e, r = SPARSE_MIN_ROWS + 5, 9, 7, 4, 3
    x = torch.randn(t, k, generator=gen, dtype=torch.float64)
    w, b = torch.randn(n, k, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    a = torch.randn(e, r, k, generator=gen, dtype=torch.float64)
    bb = torch.randn(e, n, r, generator=gen, dtype=torch.float64)
    g = make_gates(pattern, (t,), e, gen)
    dy = torch.randn(t, n, generator=gen, dtype=torch.float64)
    outs = {}
    for name, fn in (("loop", lora_mixture_loop), ("grouped", lora_mixture_torch)):
        leaves = [v.clone().requires_grad_(True) for v in (x, a, bb)]
        y = fn(leaves[0], w, b, leaves[1], leaves[2], g, 0.75, "output")
        y.backward(dy)
        outs[name] = [y] + [v.grad for v in leaves]
    for label, got, want in zip(["y", "dx", "da", "db"], outs["grouped"], outs["loop"]):
        err = (got - want).abs()
        assert err.max() <= 1e-10 * (1 + want.abs().max()), f"{label}: max err {err.max():.3e}, mean {err.mean():.3e}"


def test_one_hot_rows():
    assert one_hot_rows(torch.tensor([[0.0, 2.0], [0.0, 0.0]]))
    assert not one_hot_rows(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))


def _args(**over):
    args = dict(x=torch.randn(3, 5), weight=torch.randn(4, 5), bias=torch.randn(4), lora_a=torch.randn(2, 2, 5),
                lora_b=torch.randn(2, 4, 2), gates=torch.rand(3, 2), scale=1.0)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(x=torch.randn(3, 6)), "last dim 6"),
        (dict(bias=torch.randn(5)), "bias must be"),
        (dict(lora_a=torch.randn(2, 2, 4)), "lora_a must be"),
        (dict(lora_b=torch.randn(2, 4, 3)), "lora_b must be"),
        (dict(gates=torch.rand(3, 3)), "gates must end in E=2"),
        (dict(gates=torch.rand(2, 2)), "leading dims"),
        (dict(weight=torch.randn(4, 5, dtype=torch.float64)), "weight dtype"),
        (dict(x=torch.randint(0, 3, (3, 5))), "floating-point"),
        (dict(lora_a=torch.randn(65, 2, 5), lora_b=torch.randn(65, 4, 2), gates=torch.rand(3, 65)), "E=65"),
        (dict(lora_a=torch.randn(2, 129, 5), lora_b=torch.randn(2, 4, 129)), "r=129"),
    ],
)
def test_bad_arguments_raise_clearly(over, match):
    with pytest.raises(ValueError, match=match):
        lora_mixture(**_args(**over))


def test_bad_mode_and_backend():
    with pytest.raises(ValueError, match="mode must be"):
        lora_mixture(**_args(), mode="sum")
    with pytest.raises(ValueError, match="backend must be"):
        lora_mixture(**_args(), backend="cuda")


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        lora_mixture(**_args(), backend="triton")


def test_auto_on_cpu_is_torch_and_matches_loop():
    args = _args()
    y = lora_mixture(**args, backend="auto")
    want = lora_mixture_loop(*args.values())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
