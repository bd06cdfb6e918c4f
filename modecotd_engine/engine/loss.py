"""Cross-entropy on the supervised positions only.

The student's vocabulary is large (49k for SmolLM2) and most positions of a distillation batch are
prompt or padding, so the decoder's hidden states are gathered at the supervised positions first
and only those rows go through the output head: logits are never materialised for the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets) for next-token prediction: position j predicts labels[:, j + 1].

    Args:
        labels: (B, L) token ids, -100 where there is no loss.
    Returns:
        mask (B, L-1) bool over hidden-state positions, targets (S,) the ids they predict.
    """
    nxt = labels[:, 1:]
    mask = nxt != -100
    return mask, nxt[mask]


def supervised_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    per_sequence: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over supervised tokens of a causal LM batch.

    Args:
        model: a Hugging Face causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        input_ids: (B, L).
        attention_mask: (B, L).
        labels: (B, L), -100 on prompt and padding.
        per_sequence: also return each sequence's mean loss (B,).
    Returns:
        the scalar mean loss (fp32), and with ``per_sequence`` the (B,) per-sequence means.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask, targets = supervised_positions(labels)
    if targets.numel() == 0:
        raise ValueError("batch has no supervised token (every label is -100)")
    h = hidden[:, :-1][mask]  # (S, H)
    logits = model.get_output_embeddings()(h).float()  # (S, V)
    tok = F.cross_entropy(logits, targets, reduction="none")  # (S,)
    loss = tok.mean()
    if not per_sequence:
        return loss
    seq = torch.zeros(labels.shape[0], device=tok.device, dtype=tok.dtype)
    rows = mask.nonzero()[:, 0]
    seq.index_add_(0, rows, tok)
    counts = mask.sum(1).clamp_min(1).to(tok.dtype)
    return loss, seq / counts
