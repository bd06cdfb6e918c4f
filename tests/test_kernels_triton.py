"""Triton backend of ``lora_mixture`` against the float64 per-expert oracle.

On CPU these run Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any kernel
module is imported); on a CUDA machine the same tests run the compiled kernels, bf16 included.
Every case checks the forward and dX, dA, dB, dG for one random dy. The tolerance is a budget
taken from data: the kernel may be at most twice as far from the float64 oracle as the grouped
torch path computing in the same dtype, plus one ulp at the output's scale (see ``assert_budget``).
"""

from __future__ import annotations

import os

import pytest
import torch

from modecotd_engine.kernels import lora_mixture, lora_mixture_loop

ON_CUDA = torch.cuda.is_available()
if ON_CUDA:
    # compiled kernels: one autotune candidate per shape keeps this file's many shapes fast
    os.environ.setdefault("MODECOTD_TRITON_TUNE", "quick")
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# The interpreter has no bfloat16 arithmetic; the compiled kernels do.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
# Fallback table (as in flash-attention's and Liger's tests): fp32 1e-4/1e-5 and bf16 5e-2/2e-2; fp16
# carries 3 more mantissa bits than bf16, so its row is bf16's divided by 8.
FALLBACK = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (6e-3, 2.5e-3),
    torch.bfloat16: (5e-2, 2e-2),
}
PATTERNS = ["one_hot_identical", "one_hot_distinct", "one_hot_grouped", "one_hot_padded", "dense_softmax",
            "zipf", "top2", "all_zero"]
SCALE = 0.75


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def make_gates(pattern: str, t: int, e: int, gen: torch.Generator) -> torch.Tensor:
    """(T, E) float32 gates of a named pattern (punica's adapter-popularity patterns)."""
    if pattern == "one_hot_identical":
        idx = torch.full((t,), e - 1, dtype=torch.long)
    elif pattern == "one_hot_distinct":
        idx = torch.arange(t) % e  # neighbouring rows use different experts
    elif pattern == "one_hot_grouped":
        idx = torch.sort(torch.randint(0, e, (t,), generator=gen)).values  # rows sorted by expert
    elif pattern == "one_hot_padded":
        # grouped task gates with a run of padding tokens (all-zero gate rows) in the middle: row
        # tiles then mix one expert with rows that no expert touches
        idx = torch.sort(torch.randint(0, e, (t,), generator=gen)).values
        g = torch.nn.functional.one_hot(idx, e).float()
        g[t // 3 : t // 3 + 40] = 0.0
        return g
    elif pattern == "zipf":
        p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64) ** 1.5
        idx = torch.multinomial(p, t, replacement=True, generator=gen)
    elif pattern == "dense_softmax":
        return torch.softmax(torch.randn(t, e, generator=gen), dim=-1)
    elif pattern == "top2":
        logits = torch.randn(t, e, generator=gen)
        k = min(2, e)
        top = logits.topk(k, dim=-1)
        g = torch.zeros(t, e)
        return g.scatter_(1, top.indices, torch.softmax(top.values, dim=-1))
    elif pattern == "all_zero":
        return torch.zeros(t, e)
    else:
        raise ValueError(pattern)
    return torch.nn.functional.one_hot(idx, e).float()


def make_case(t=133, k=37, n=45, e=3, r=5, dtype=torch.float32, pattern="dense_softmax", bias=True,
              lora_dtype=None, gate_dtype=None, seed=0, lead=None):
    """Leaf tensors made in their target dtypes; the oracle gets ``.double()`` of the same values."""
    gen = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    gate_dtype = gate_dtype or dtype
    shape = tuple(lead) if lead is not None else (t,)
    t = 1
    for s in shape:
        t *= s

    def rnd(*size, std=1.0, dt=dtype):
        return (torch.randn(*size, generator=gen) * std).to(dt).to(DEVICE)

    case = {
        "x": rnd(*shape, k),
        "weight": rnd(n, k, std=k ** -0.5),
        "bias": rnd(n) if bias else None,
        "lora_a": rnd(e, r, k, std=k ** -0.5, dt=lora_dtype),
        "lora_b": rnd(e, n, r, std=1.0, dt=lora_dtype),
        "gates": make_gates(pattern, t, e, gen).reshape(*shape, e).to(gate_dtype).to(DEVICE),
        "dy": rnd(*shape, n),
    }
    return case


GRAD_NAMES = ("x", "lora_a", "lora_b", "gates")


def run(case, backend, grads=GRAD_NAMES, mode="output", double=False, prep=None):
    """Forward + backward with ``case['dy']``; returns {"y": ..., "dx": ..., ...}."""
    leaves = {}
    for name in ("x", "weight", "bias", "lora_a", "lora_b", "gates"):
        t = case[name]
        if t is None:
            leaves[name] = None
            continue
        t = t.detach().clone()
        if double:
            t = t.double()
        leaves[name] = t.requires_grad_(name in grads)
    args = dict(leaves)
    if prep is not None:
        args = prep(args)
    if backend == "oracle":
        y = lora_mixture_loop(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                              args["gates"], SCALE, mode)
    else:
        y = lora_mixture(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                         args["gates"], SCALE, mode, backend=backend)
    dy = case["dy"].double() if double else case["dy"]
    y.backward(dy)
    out = {"y": y.detach()}
    for name in grads:
        out["d" + name] = leaves[name].grad
    return out


def assert_budget(name, got, ref, torch_got):
    """max|got - ref64| <= 2 * max|torch_same_dtype - ref64| + eps, else the fallback table."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if ref.numel() == 0:
        return
    err = (got.double() - ref).abs()
    torch_err = (torch_got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    # one ulp at the output's scale: where torch happens to be exact the budget is still not zero
    eps = torch.finfo(got.dtype).eps * max(scale, 1e-30)
    budget = 2.0 * torch_err + eps
    max_err, mean_err = err.max().item(), err.mean().item()
    if max_err <= budget:
        return
    atol, rtol = FALLBACK[got.dtype]
    ok = bool((err <= atol + rtol * ref.abs()).all())
    assert ok, (
        f"{name} ({got.dtype}): max err {max_err:.3e}, mean err {mean_err:.3e}; budget {budget:.3e} "
        f"(2 x torch err {torch_err:.3e} + eps {eps:.1e}); fallback atol {atol} rtol {rtol} also "
        f"fails; |ref| max {scale:.3e}"
    )


def check_against_oracle(case, mode="output", grads=GRAD_NAMES, prep=None, backend="triton"):
    ref = run(case, "oracle", grads, mode, double=True, prep=prep)
    tor = run(case, "torch", grads, mode, prep=prep)
    tri = run(case, backend, grads, mode, prep=prep)
    for key in ref:
        if ref[key] is None:
            assert tri[key] is None, key
            continue
        assert tri[key] is not None, f"{key}: no gradient"
        assert tri[key].dtype == tor[key].dtype, f"{key}: dtype {tri[key].dtype} != {tor[key].dtype}"
        assert_budget(key, tri[key], ref[key], tor[key])
    return tri


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gate_patterns_match_oracle(pattern, mode):
    # T=133 spans several row tiles; K=37, N=45 are not multiples of any tile; E=3, r=5 put
    # experts in more than one group in the interpreter's tiling.
    case = make_case(pattern=pattern, bias=PATTERNS.index(pattern) % 2 == 0, seed=1)
    check_against_oracle(case, mode)


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("pattern", ["one_hot_grouped", "one_hot_padded", "one_hot_distinct", "zipf", "top2",
                                     "all_zero"])
def test_sparse_backward_without_gate_grad(pattern, mode):
    # Gates without grad let every kernel skip experts whose gates are zero in a tile.
    case = make_case(pattern=pattern, seed=2)
    check_against_oracle(case, mode, grads=("x", "lora_a", "lora_b"))


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("t", [1, 3, 7])
@pytest.mark.parametrize("pattern", ["dense_softmax", "one_hot_distinct"])
def test_small_batches(t, pattern, mode):
    # K=70 makes the forward shrink split K over programs, as it does for decode on a GPU
    case = make_case(t=t, k=70, pattern=pattern, seed=3 + t)
    check_against_oracle(case, mode)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("pattern", ["dense_softmax", "one_hot_grouped"])
def test_half_precision(dtype, mode, pattern):
    case = make_case(dtype=dtype, pattern=pattern, seed=4)
    check_against_oracle(case, mode)


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_fp32_experts_with_half_activations(mode):
    # fp32 LoRA weights and gates next to 16-bit activations; gradients come back in each dtype.
    half = torch.bfloat16 if ON_CUDA else torch.float16
    case = make_case(dtype=half, lora_dtype=torch.float32, gate_dtype=torch.float32,
                     pattern="top2", seed=5)
    out = check_against_oracle(case, mode)
    assert out["y"].dtype == half and out["dx"].dtype == half
    assert out["dlora_a"].dtype == torch.float32 and out["dlora_b"].dtype == torch.float32
    assert out["dgates"].dtype == torch.float32


@pytest.mark.parametrize("k,n,e,r", [(100, 130, 5, 20), (16, 16, 1, 1), (33, 17, 4, 16), (48, 70, 9, 3)])
def test_shapes(k, n, e, r):
    # r=20 pads to 32 (one expert per group); E=1, r=1 the smallest layer; K/N over several tiles.
    case = make_case(t=41, k=k, n=n, e=e, r=r, pattern="dense_softmax", seed=6)
    check_against_oracle(case, "output")


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_leading_dims_and_non_contiguous_inputs(mode):
    case = make_case(lead=(3, 11), pattern="top2", seed=7)

    def prep(a):
        # same values, strided layouts: x a column slice (row stride K+5), W transposed in memory,
        # A/B permuted, gates sliced
        a = dict(a)
        x = a["x"]
        a["x"] = torch.cat([x, torch.zeros_like(x[..., :5])], dim=-1)[..., : x.shape[-1]]
        a["weight"] = a["weight"].t().contiguous().t()  # (N, K) with stride (1, N)
        a["lora_a"] = a["lora_a"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
        a["lora_b"] = a["lora_b"].permute(0, 2, 1).contiguous().permute(0, 2, 1)
        g = a["gates"]
        a["gates"] = torch.cat([g, torch.zeros_like(g)], dim=-1)[..., : g.shape[-1]]
        return a

    out = check_against_oracle(case, mode, prep=prep)
    assert out["y"].shape == (3, 11, case["weight"].shape[0])
    assert out["dx"].shape == case["x"].shape and out["dgates"].shape == case["gates"].shape


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("grads", [("lora_b",), ("gates",), ("x",), ("lora_a", "gates")])
def test_partial_gradients(grads, mode):
    # Each subset takes a different set of kernel outputs (dH only, H~ only, dG only ...).
    case = make_case(pattern="dense_softmax", seed=8)
    check_against_oracle(case, mode, grads=grads)


def test_frozen_weight_grads_when_requested():
    # W and b are frozen in the engine; if a caller makes them trainable they get torch's dW, db.
    case = make_case(pattern="zipf", seed=9)
    check_against_oracle(case, "output", grads=("x", "weight", "bias", "lora_a"))


def test_no_grad_inference_and_empty_batch():
    case = make_case(pattern="one_hot_grouped", seed=10)
    with torch.no_grad():
        y = lora_mixture(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                         case["gates"], SCALE, "output", backend="triton")
        ref = lora_mixture_loop(*(t.double() for t in (case["x"], case["weight"], case["bias"],
                                                      case["lora_a"], case["lora_b"], case["gates"])),
                                SCALE, "output")
    assert_budget("y", y, ref, lora_mixture(case["x"], case["weight"], case["bias"], case["lora_a"],
                                            case["lora_b"], case["gates"], SCALE, "output",
                                            backend="torch").detach())
    x = case["x"][:0].clone().requires_grad_(True)
    a = case["lora_a"].clone().requires_grad_(True)
    y = lora_mixture(x, case["weight"], None, a, case["lora_b"], case["gates"][:0], SCALE, "weight",
                     backend="triton")
    assert y.shape == (0, case["weight"].shape[0])
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(a.grad, torch.zeros_like(a))


def test_unsupported_dtype_is_a_clear_error():
    case = make_case(t=4, pattern="dense_softmax", seed=11)
    args = [case[k].double() if case[k] is not None else None
            for k in ("x", "weight", "bias", "lora_a", "lora_b", "gates")]
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        lora_mixture(*args, SCALE, "output", backend="triton")
    args = [case[k] for k in ("x", "weight", "bias", "lora_a", "lora_b")] + [case["gates"].double()]
    with pytest.raises(ValueError, match="gates has dtype torch.float64"):
        lora_mixture(*args, SCALE, "output", backend="triton")


@pytest.mark.skipif(ON_CUDA, reason="the CPU interpreter's bfloat16 limit only applies without CUDA")
def test_interpreter_rejects_bfloat16():
    case = make_case(t=4, dtype=torch.bfloat16, pattern="dense_softmax", seed=12)
    with pytest.raises(ValueError, match="interpreter"):
        lora_mixture(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                     case["gates"], SCALE, "output", backend="triton")


def test_launcher_rejects_unflattened_input():
    from modecotd_engine.kernels.triton_lora import lora_mixture_fwd

    case = make_case(lead=(2, 3), pattern="dense_softmax", seed=13)
    with pytest.raises(ValueError, match="2-D"):
        lora_mixture_fwd(case["x"], case["weight"], None, case["lora_a"], case["lora_b"], case["gates"],
                         SCALE, "output")
