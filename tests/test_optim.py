"""ExpertAdamW: each expert follows torch.optim.AdamW run on its own steps only."""

import pytest
import torch

from modecotd_engine.engine.optim import ExpertAdamW

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = [[0], [1], [0, 2], [0, 1, 2], [2], [1], [1], [0, 1, 2], [2, 0]]


def _params(seed=0, e=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(e, 4, 5, generator=g, dtype=torch.float64),
            torch.randn(e, 6, 4, generator=g, dtype=torch.float64)]


def _grads(step, shapes):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def _lr(step):
    return 1e-2 * (0.8 ** step)


def _run(opt, params, schedule, start=0):
    for i, active in enumerate(schedule, start):
        for p, gr in zip(params, _grads(i, [p.shape for p in params])):
            p.grad = gr.clone()
        opt.param_groups[0]["lr"] = _lr(i)
        opt.step(active)
        opt.zero_grad()


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_each_expert_matches_torch_adamw_on_its_own_steps(wd):
    params = _params()
    ours = [p.clone() for p in params]
    opt = ExpertAdamW(ours, num_experts=3, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    _run(opt, ours, SCHEDULE)
    for e in range(3):
        alone = [p[e].clone().requires_grad_(True) for p in params]
        ref = torch.optim.AdamW(alone, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
        for i, active in enumerate(SCHEDULE):
            if e not in active:
                continue  # the gradient of step i is only seen by the experts active at step i
            for a, gr in zip(alone, _grads(i, [p.shape for p in params])):
                a.grad = gr[e].clone()
            ref.param_groups[0]["lr"] = _lr(i)
            ref.step()
        for a, o in zip(alone, ours):
            torch.testing.assert_close(o[e], a.detach(), rtol=0, atol=1e-12)
    assert opt.steps.tolist() == [sum(e in a for a in SCHEDULE) for e in range(3)]


def test_idle_experts_are_bit_identical():
    params = _params()
    opt = ExpertAdamW(params, num_experts=3, lr=1e-2)
    _run(opt, params, SCHEDULE[:4])  # every expert has moments now
    before = [p.clone() for p in params] + [m.clone() for m in opt.exp_avg + opt.exp_avg_sq]
    _run(opt, params, [[1]], start=4)
    after = params + opt.exp_avg + opt.exp_avg_sq
    for b, a in zip(before, after):
        assert torch.equal(b[0], a[0]) and torch.equal(b[2], a[2])
        assert not torch.equal(b[1], a[1])


def test_state_round_trip_resumes_exactly():
    whole = _params()
    opt = ExpertAdamW(whole, num_experts=3, lr=1e-2, weight_decay=0.01)
    _run(opt, whole, SCHEDULE)

    part = _params()
    first = ExpertAdamW(part, num_experts=3, lr=1e-2, weight_decay=0.01)
    _run(first, part, SCHEDULE[:5])
    saved = {k: v.clone() for k, v in first.state_tensors().items()}
    resumed_params = [p.clone() for p in part]
    second = ExpertAdamW(resumed_params, num_experts=3, lr=1e-2, weight_decay=0.01)
    second.load_state_tensors(saved)
    _run(second, resumed_params, SCHEDULE[5:], start=5)
    for a, b in zip(whole, resumed_params):
        assert torch.equal(a, b)


def test_bad_input_is_named():
    params = _params()
    with pytest.raises(ValueError, match="parameter 1 has shape"):
        ExpertAdamW([params[0], params[1][:2]], num_experts=3)
    opt = ExpertAdamW(params, num_experts=3)
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="out of range"):
        opt.step([3])
    state = opt.state_tensors()
    del state["steps"]
    with pytest.raises(ValueError, match="older version"):
        opt.load_state_tensors(state, source="ckpt/step-1")
    state = opt.state_tensors()
    state["1.exp_avg"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="'1.exp_avg' has shape"):
        opt.load_state_tensors(state)
