"""The hand-written RMSNorm and the blocked linear cross-entropy against plain-torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from modecotd_engine.engine.fused import fused_norms_enabled, norm_modules, rms_norm, use_fused_norms
from modecotd_engine.engine.loss import linear_cross_entropy, supervised_loss
from modecotd_engine.engine.student import load_student


def _rms_reference(x, w, eps):
    """The RMSNorm formula, computed in x's dtype (float64 here) by autograd."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 64), (1, 1, 16)])
def test_rms_norm_float64_forward_and_gradients(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    w = (torch.rand(shape[-1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    want = _rms_reference(x, w, 1e-5)
    gx_want, gw_want = torch.autograd.grad(want, (x, w), dy)
    got = rms_norm(x, w, 1e-5)
    gx, gw = torch.autograd.grad(got, (x, w), dy)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx, gx_want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, gw_want, rtol=0, atol=1e-12)
    assert gx.abs().max() > 1e-3 and gw.abs().max() > 1e-3  # not a vacuous comparison


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_forward_is_llama_rmsnorm_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=gen) + 0.5)
    x = torch.randn(3, 9, 48, generator=gen).to(dtype) * 4
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


def test_rms_norm_low_precision_gradient_matches_autograd():
    """bf16: the closed-form backward and autograd through LlamaRMSNorm differ by rounding only."""
    gen = torch.Generator().manual_seed(2)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16).requires_grad_(False)
    x64 = torch.randn(4, 10, 64, generator=gen, dtype=torch.float64)
    dy = torch.randn(4, 10, 64, generator=gen).to(torch.bfloat16)
    exact, = torch.autograd.grad(_rms_reference(x64.requires_grad_(), norm.weight.double(), 1e-5), x64, dy.double())
    xb = x64.detach().to(torch.bfloat16).requires_grad_()
    ours, = torch.autograd.grad(rms_norm(xb, norm.weight, 1e-5), xb, dy)
    xb2 = xb.detach().requires_grad_()
    hf, = torch.autograd.grad(norm(xb2), xb2, dy)
    # both are bf16 roundings of the same float32 computation: within a few bf16 ulps of the exact value
    err_ours = (ours.double() - exact).abs().max()
    err_hf = (hf.double() - exact).abs().max()
    assert err_ours <= 2 * err_hf + 1e-6, (err_ours, err_hf)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match=r"RMSNorm weight \(5,\) does not fit input \(2, 4\)"):
        rms_norm(torch.zeros(2, 4), torch.ones(5), 1e-6)


def test_use_fused_norms_switches_and_restores(student_dir):
    st = load_student(student_dir, dtype=torch.float32)
    model = st.model
    n = len(norm_modules(model))
    assert n == 2 * model.config.num_hidden_layers + 1
    assert fused_norms_enabled(model)  # load_student's default
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(ids).logits
    assert use_fused_norms(model, False) == n and not fused_norms_enabled(model)
    assert all("forward" not in m.__dict__ for m in norm_modules(model))
    with torch.no_grad():
        stock = model(ids).logits
    assert torch.equal(fused, stock)
    assert use_fused_norms(model, True) == n and fused_norms_enabled(model)
    assert load_student(student_dir, fused_norms=False).model is not None


@pytest.mark.parametrize("rows,block", [(13, 4), (13, 13), (13, 100), (1, 1), (32, 7)])
def test_linear_cross_entropy_float64(rows, block):
    gen = torch.Generator().manual_seed(rows * 31 + block)
    v, h = 37, 12
    hidden = torch.randn(rows, h, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (rows,), generator=gen)
    dl = torch.rand(rows, generator=gen, dtype=torch.float64)
    want = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    g_want, = torch.autograd.grad(want, hidden, dl)
    got = linear_cross_entropy(hidden, weight, targets, block_rows=block)
    g, = torch.autograd.grad(got, hidden, dl)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_want, rtol=0, atol=1e-12)
    assert g.abs().max() > 1e-3


def test_linear_cross_entropy_bf16_matches_float_logits_path():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(500, 32, generator=gen) * 0.2).to(torch.bfloat16)
    targets = torch.randint(0, 500, (20,), generator=gen)
    want = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")
    g_want, = torch.autograd.grad(want.mean(), hidden)
    got = linear_cross_entropy(hidden, weight, targets, block_rows=6)
    g, = torch.autograd.grad(got.mean(), hidden)
    assert got.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same bf16 logits, float32 softmax
    torch.testing.assert_close(g.float(), g_want.float(), rtol=0.02, atol=1e-4)  # bf16 rounding of dlogits


def test_linear_cross_entropy_errors():
    h, w = torch.zeros(3, 4), torch.zeros(10, 4)
    with pytest.raises(ValueError, match="must be"):
        linear_cross_entropy(h, torch.zeros(10, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="one per row"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        linear_cross_entropy(h, w, torch.zeros(3))
    hh, ww = torch.randn(3, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    t32 = torch.tensor([0, 5, 9], dtype=torch.int32)
    torch.testing.assert_close(linear_cross_entropy(hh, ww, t32),
                               F.cross_entropy(hh @ ww.t(), t32.long(), reduction="none"), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="requires grad"):
        linear_cross_entropy(h, w.requires_grad_(), torch.zeros(3, dtype=torch.long))


def test_supervised_loss_equals_full_logits_cross_entropy(student_dir):
    """The loss on the supervised positions equals Hugging Face's loss over the same labels (float64)."""
    model = load_student(student_dir, dtype=torch.float32).model.double()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 200, (3, 14), generator=gen)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 10:] = -100
    mask = torch.ones_like(ids)
    ours = supervised_loss(model, ids, mask, labels)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert ours.dtype == torch.float64
    assert abs(float(ours) - float(want)) < 1e-12
