"""Attention for the student on CPUs: grouped-query attention written as two batched matmuls.

transformers' default attention on CPU is ``scaled_dot_product_attention``, whose CPU flash kernel is
slow in bfloat16 at the short sequences distillation trains on: measured on the 2-core AMD EPYC
(avx512_bf16), batch 8 x 80 tokens, 9 query heads over 3 key/value heads, head dim 64, forward plus
backward of one layer: 11.4 ms with SDPA, 4.1 ms as matmul + float32 softmax + matmul. Across the
30 layers of SmolLM2-135M that is ~30% of a bf16 training step (``modecotd-engine bench train``).

:func:`grouped_attention` is that matmul form, with one more saving over transformers' "eager"
attention: query heads that share a key/value head are stacked along the row axis, so keys and
values are never repeated (no ``repeat_kv`` copies in the forward, no sum over the copies in the
backward). :func:`select_attention` registers it under the name :data:`GROUPED` and switches a
model to it where it is measured to pay (CPU, bfloat16 or float16 activations); elsewhere the model
keeps its attention (SDPA's CPU kernel is the faster one in float32, flash kernels win on GPUs).
"""

from __future__ import annotations

import torch
from torch import nn

GROUPED = "modecotd_grouped"
_registered = False


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """softmax(Q K^T * scaling + mask) V for query (B, H, L, D) and key/value (B, KV, S, D).

    ``attention_mask`` is transformers' additive mask (B or 1, 1, L, M) or None. Keys and values may
    be longer than the mask (M < S: a :class:`~.kv_cache.GrowingLayer` with ``full_reads`` hands over
    its whole buffers); positions from M on are masked out. Returns the output as (B, L, H, D), the
    layout the attention modules reshape from, and no weights.
    """
    b, h, q_len, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads do not group over {kv} key/value heads")
    g = h // kv
    q = query.reshape(b, kv, g * q_len, d)  # heads of one group stacked along the rows
    scores = torch.matmul(q, key.transpose(-1, -2)).view(b, kv, g, q_len, s)
    acc = torch.promote_types(scores.dtype, torch.float32)  # softmax in >= fp32
    if attention_mask is not None:
        # mask + scaling * scores in one op: the upcast, the scaling and the mask in a single pass
        mask = attention_mask[:, :, None, :, : s].to(acc)  # (B, 1, 1, L, S) over (B, KV, G, L, S)
        if mask.shape[-1] < s:  # a cache's spare room past the filled positions
            mask = nn.functional.pad(mask, (0, s - mask.shape[-1]), value=torch.finfo(acc).min)
        scores = torch.add(mask, scores, alpha=scaling)
    else:
        scores = scores.to(acc) * scaling
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout and module.training:
        probs = nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.view(b, kv, g * q_len, s), value)  # (B, KV, G*L, D)
    return out.view(b, h, q_len, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`GROUPED` a valid ``attn_implementation`` (attention and mask); idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(GROUPED, grouped_attention)
        AttentionMaskInterface.register(GROUPED, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        _registered = True
    return GROUPED


def pays_off(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True where :func:`grouped_attention` measured faster than the model's default attention."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def select_attention(model: nn.Module, device: torch.device | str, dtype: torch.dtype,
                     choice: str = "auto") -> str:
    """Set the model's attention: ``auto`` (grouped where it pays, else unchanged), ``grouped``, or
    any transformers name (``sdpa``, ``eager``, ...). Returns the implementation now in use."""
    if choice == "auto":
        choice = "grouped" if pays_off(device, dtype) else None
    if choice == "grouped":
        choice = register()
    if choice:
        model.set_attn_implementation(choice)
    return model.config._attn_implementation
