"""The grouped attention equals plain softmax attention, and a student using it equals SDPA."""

import pytest
import torch

from modecotd_engine.engine.attention import GROUPED, grouped_attention, pays_off, register
from modecotd_engine.engine.generate import GenerationConfig, generate
from modecotd_engine.engine.student import StudentError, load_student

pytestmark = pytest.mark.usefixtures("one_thread")


class _Module(torch.nn.Module):
    pass


def _reference(q, k, v, mask, scaling):
    """Keys and values repeated per query head, softmax(QK^T s + mask) V, output (B, L, H, D)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) * scaling
    if mask is not None:
        s = s + mask
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("heads,kv,q_len,kv_len,masked", [(4, 2, 7, 7, True), (6, 3, 1, 9, True),
                                                          (3, 1, 5, 5, False), (2, 2, 4, 6, True)])
def test_grouped_attention_matches_reference_forward_and_grads(heads, kv, q_len, kv_len, masked):
    torch.manual_seed(0)
    b, d = 3, 8
    q = torch.randn(b, heads, q_len, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, kv, kv_len, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, kv, kv_len, d, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:  # causal over the last q_len keys, plus left padding of one row
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        allowed = allowed.expand(b, 1, q_len, kv_len).clone()
        allowed[1, :, :, :2] = False
        mask = torch.zeros(b, 1, q_len, kv_len, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    out, weights = grouped_attention(_Module(), q, k, v, mask, scaling=d ** -0.5)
    ref = _reference(q, k, v, mask, d ** -0.5)
    assert weights is None and out.shape == (b, q_len, heads, d) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12, msg=f"d{name}")


def test_keys_past_the_mask_are_masked_out():
    """Keys and values longer than the mask (a cache's spare room, here random) change nothing: the
    output equals attention over the masked length, forward and gradients of the real positions."""
    torch.manual_seed(0)
    b, heads, kv, q_len, m, room, d = 3, 6, 2, 1, 9, 5, 8
    q = torch.randn(b, heads, q_len, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, kv, m + room, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, kv, m + room, d, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(b, 1, q_len, m, dtype=torch.float64)
    mask[1, ..., :3] = torch.finfo(torch.float64).min  # left padding of one row
    out, _ = grouped_attention(_Module(), q, k, v, mask, scaling=d ** -0.5)
    ref = _reference(q, k[:, :, :m], v[:, :, :m], mask, d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a[:, :, :m] if name != "q" else a, r[:, :, :m] if name != "q" else r,
                                   rtol=0, atol=1e-12, msg=f"d{name}")
        if name != "q":
            assert torch.count_nonzero(a[:, :, m:]) == 0, f"d{name} reaches the spare room"


def test_uneven_heads_are_refused():
    q, kv = torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="3 query heads do not group over 2"):
        grouped_attention(_Module(), q, kv, kv, None, scaling=0.5)


def test_student_with_grouped_attention_matches_sdpa(tiny_student_dir):
    ours = load_student(tiny_student_dir, device="cpu", dtype="float32", attention="grouped")
    sdpa = load_student(tiny_student_dir, device="cpu", dtype="float32", attention="sdpa")
    ours.model.double(), sdpa.model.double()
    assert ours.model.config._attn_implementation == GROUPED
    ids = torch.randint(3, 200, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        a = ours.model(input_ids=ids, attention_mask=mask).logits
        b = sdpa.model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-10)
    # decoding with a KV cache (queries shorter than keys) gives the same greedy text
    # (the grouped student's cache hands its whole buffers to the attention; 60 tokens grow them
    # several times)
    cfg = GenerationConfig(max_new_tokens=60)
    prompts = ["abc", "a longer prompt"]
    assert generate(ours.model, ours.tokenizer, prompts, config=cfg) == \
        generate(sdpa.model, sdpa.tokenizer, prompts, config=cfg)


def test_auto_choice_and_bad_name(tiny_student_dir):
    assert pays_off("cpu", torch.bfloat16) and not pays_off("cpu", torch.float32)
    assert not pays_off("cuda", torch.bfloat16)
    assert load_student(tiny_student_dir, device="cpu", dtype="bfloat16").model.config._attn_implementation == register()
    assert load_student(tiny_student_dir, device="cpu", dtype="float32").model.config._attn_implementation == "sdpa"
    with pytest.raises(StudentError, match="attention 'nope' cannot be used"):
        load_student(tiny_student_dir, device="cpu", attention="nope")
