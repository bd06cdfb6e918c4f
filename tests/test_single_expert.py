"""One expert on every token: the plain-LoRA path against the oracle, the grouped path and the gates."""

from __future__ import annotations

import pytest
import torch

from modecotd_engine.engine.experts import ExpertBank
from modecotd_engine.engine.inject import GateState, inject_experts
from modecotd_engine.engine.loss import supervised_loss
from modecotd_engine.engine.student import load_student
from modecotd_engine.kernels import lora_mixture, lora_mixture_loop, lora_single_expert


def _tensors(dtype, bias, seed=0, e=4, r=3, k=10, n=7, lead=(2, 5)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    a = torch.randn(e, r, k, generator=gen, dtype=torch.float64) * 0.5
    bb = torch.randn(e, n, r, generator=gen, dtype=torch.float64) * 0.5
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, a, bb, dy


@pytest.mark.parametrize("mode", ["output", "weight"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gate", [1.0, 0.7])
def test_float64_against_the_oracle(mode, bias, gate):
    x, w, b, a, bb, dy = _tensors(torch.float64, bias, seed=int(gate * 10) + bias)
    expert = 2
    gates = torch.zeros(*x.shape[:-1], a.shape[0], dtype=torch.float64)
    gates[..., expert] = gate
    inputs = [t.clone().requires_grad_() for t in (x, w, a, bb)] + ([b.clone().requires_grad_()] if bias else [])
    xo, wo, ao, bo, *bias_o = inputs
    want = lora_mixture_loop(xo, wo, bias_o[0] if bias else None, ao, bo, gates, 1.5, mode)
    grads_want = torch.autograd.grad(want, inputs, dy)
    inputs2 = [t.detach().clone().requires_grad_() for t in inputs]
    x2, w2, a2, b2, *bias_2 = inputs2
    got = lora_single_expert(x2, w2, bias_2[0] if bias else None, a2, b2, expert, gate, 1.5, mode=mode,
                             backend="torch")
    grads = torch.autograd.grad(got, inputs2, dy)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for name, g, gw in zip(["x", "weight", "lora_a", "lora_b", "bias"], grads, grads_want):
        torch.testing.assert_close(g, gw, rtol=0, atol=1e-12, msg=f"d{name}")
    others = [e for e in range(a.shape[0]) if e != expert]
    assert grads[2][others].abs().max() == 0 and grads[3][others].abs().max() == 0
    assert grads[2][expert].abs().max() > 1e-3 and grads[3][expert].abs().max() > 1e-3


def test_bfloat16_equals_the_grouped_path_bit_for_bit():
    x, w, _, a, bb, dy = _tensors(torch.bfloat16, False, seed=5, e=5, r=8, k=64, n=48, lead=(3, 9))
    a, bb = a.float(), bb.float()
    gates = torch.zeros(*x.shape[:-1], 5)
    gates[..., 3] = 1.0
    runs = []
    for fn in (lambda xx, aa, bbb: lora_mixture(xx, w, None, aa, bbb, gates, 2.0, backend="torch"),
               lambda xx, aa, bbb: lora_single_expert(xx, w, None, aa, bbb, 3, 1.0, 2.0, backend="torch")):
        xx, aa, bbb = x.clone().requires_grad_(), a.clone().requires_grad_(), bb.clone().requires_grad_()
        y = fn(xx, aa, bbb)
        runs.append((y, *torch.autograd.grad(y, (xx, aa, bbb), dy)))
    for t1, t2 in zip(*runs):
        assert t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_errors():
    x, w, _, a, bb, _ = _tensors(torch.float32, False)
    with pytest.raises(ValueError, match=r"expert must be an int in 0\.\.3, got 4"):
        lora_single_expert(x, w, None, a.float(), bb.float(), 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="x has last dim"):
        lora_single_expert(x[..., :5], w, None, a.float(), bb.float(), 0, 1.0, 1.0)


def test_gate_state_finds_one_expert_once_per_assignment():
    state = GateState()
    assert state.single_expert() is None
    state.gates = torch.tensor([[0.0, 0.5, 0.0]] * 3)
    assert state.single_expert() == (1, 0.5)
    per_token = torch.zeros(2, 4, 3)
    per_token[..., 2] = 1.0
    state.gates = per_token
    assert state.single_expert() == (2, 1.0)
    per_token[1, 3] = torch.tensor([1.0, 0.0, 0.0])
    state.gates = per_token  # a new assignment is analysed again
    assert state.single_expert() is None
    state.gates = torch.tensor([[0.0, 1.0, 1.0]])
    assert state.single_expert() is None
    state.gates = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    assert state.single_expert() is None  # a gate gradient needs the general path
    state.gates = torch.zeros(2, 3)
    assert state.single_expert() is None


def test_injected_student_one_task_batch_matches_general_path(student_dir, monkeypatch):
    st = load_student(student_dir, dtype=torch.float32)
    model = st.model.double()
    bank = ExpertBank.create(model, ["a", "b", "c"], rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=0)
    for m in bank.modules:  # nonzero B so that the experts change the output
        bank.lora_b[m] = torch.randn(bank.lora_b[m].shape, generator=torch.Generator().manual_seed(1),
                                     dtype=torch.float64) * 0.3
        bank.lora_a[m] = bank.lora_a[m].double()
    handle = inject_experts(model, bank, trainable=True)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 200, (3, 9), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    gates = torch.nn.functional.one_hot(torch.tensor([1, 1, 1]), 3).double()
    params = handle.lora_parameters()

    def run():
        handle.set_gates(gates)
        loss = supervised_loss(model, ids, torch.ones_like(ids), labels)
        return loss, torch.autograd.grad(loss, params)

    calls = []
    import modecotd_engine.engine.inject as inject_mod

    real = inject_mod.lora_single_expert
    monkeypatch.setattr(inject_mod, "lora_single_expert", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast, fast_grads = run()
    assert len(calls) == len(handle.layers)  # every wrapped layer took the single-expert path
    monkeypatch.setattr(GateState, "single_expert", lambda self: None)
    general, general_grads = run()
    assert abs(float(fast.detach()) - float(general.detach())) < 1e-12
    for g1, g2 in zip(fast_grads, general_grads):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    assert max(float(g.abs().max()) for g in fast_grads) > 1e-4


def test_triton_backend_builds_the_one_hot_gates():
    """backend='triton' (the interpreter on CPU) gets the same one-hot gates the torch path implies."""
    pytest.importorskip("triton")
    from modecotd_engine.kernels.ops import triton_interpreting

    if not triton_interpreting() and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    x, w, b, a, bb, dy = _tensors(torch.float32, True, seed=9, e=3, r=4, k=16, n=12, lead=(2, 3))
    a, bb = a.float(), bb.float()
    runs = []
    for backend in ("torch", "triton"):
        xx = x.clone().requires_grad_()
        y = lora_single_expert(xx, w, b, a, bb, 1, 0.5, 2.0, mode="weight", backend=backend)
        runs.append((y, *torch.autograd.grad(y, xx, dy)))
    for t1, t2 in zip(*runs):
        torch.testing.assert_close(t1, t2, rtol=1e-4, atol=1e-4)
