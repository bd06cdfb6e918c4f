"""A KV cache that appends in place: transformers' ``DynamicCache`` with growing buffers.

``DynamicLayer.update`` appends a step's keys and values with ``torch.cat``, which copies the whole
cache of the layer at every step: O(L) bytes per token per layer, O(L^2) over a generation. Measured
on SmolLM2-135M (32 rows, 48 new tokens each, bf16, 2-core CPU, ``torch.profiler``), those copies
were 58% of the decoding time. :class:`GrowingLayer` keeps each tensor at the start of a buffer with
room to spare: a step writes its token in place, and a full buffer grows by half its length at once
(amortised O(1) copies per token).

``keys`` and ``values`` read as views of the filled part. Assigning them (``reorder_cache``, the
decoder's merging of batches and cutting of rows) stores the assigned tensor as the new buffer, so
transformers' cache API and the decoder's batch surgery work unchanged; the next append grows it.

With ``full_reads`` an update returns the whole buffers, the room past the filled part included (zeros,
which the attention must mask: :func:`~.attention.grouped_attention` masks every position past its
mask's length). The attention's batched matmuls then read each (row, head) matrix with a batch stride
equal to its size, where a view of the filled part has a longer one, which the CPU batched matmul
copies to a contiguous tensor at every layer and step: an O(L) copy per token again. Measured on the
2-core AMD EPYC (bf16, 32 rows, 9 query heads over 3 key/value heads, head dim 64, one decoding
step of one layer): 2.03 ms reading 256 filled positions of a 400-position buffer as views, 0.51 ms
over a full 256-position buffer, 0.83 ms over a full 384-position one. Spare room costs attention
work, never copies, so such buffers grow by an eighth of their length rather than by half.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Smallest growth of a buffer, in positions.
MIN_GROWTH = 16


def _stored(name: str) -> property:
    """A tensor attribute kept as ``(buffer, filled length)``; reads give the filled part."""

    def get(self):
        buf, n = self.__dict__.get(name, (None, 0))
        return buf if buf is None or n == buf.shape[-2] else buf[..., :n, :]

    def put(self, tensor):
        self.__dict__[name] = (tensor, 0 if tensor is None or tensor.dim() < 2 else tensor.shape[-2])

    return property(get, put)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` (full attention) whose ``update`` writes into spare room instead of
    concatenating; same results, same API.

    Args:
        full_reads: ``update`` returns the whole buffers (filled part first, zeros after it) rather
            than views of the filled part; for an attention that masks past its mask's length.
    """

    keys = _stored("_keys")
    values = _stored("_values")

    def __init__(self, *args, full_reads: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_reads = full_reads

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append("_keys", key_states), self._append("_values", value_states)

    def get_seq_length(self) -> int:
        return self.__dict__.get("_keys", (None, 0))[1] if self.is_initialized else 0

    def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        buf, n = self.__dict__.get(name, (None, 0))
        need = n + new.shape[-2]
        if buf is None or buf.dim() != new.dim() or buf.shape[:-2] != new.shape[:-2] or buf.shape[-2] < need:
            # full reads attend over the spare room too: grow by an eighth (on average n / 16 spare
            # positions per read, a copy of the filled part every n / 8 tokens), else by half
            capacity = max(need, n + max(n // (8 if self.full_reads else 2), MIN_GROWTH))
            # zeros past the filled part: finite where a full read's masked positions are multiplied by 0
            grown = (new.new_zeros if self.full_reads else new.new_empty)(*new.shape[:-2], capacity, new.shape[-1])
            if n:
                grown[..., :n, :] = buf[..., :n, :]
            buf = grown
        buf[..., n:need, :] = new
        self.__dict__[name] = (buf, need)
        return buf if self.full_reads else buf[..., :need, :]


def growing_cache(config, full_reads: bool | None = None) -> DynamicCache:
    """``DynamicCache(config=config)`` with every plain full-attention layer a :class:`GrowingLayer`
    (sliding-window and other layer kinds are kept as transformers makes them).

    ``full_reads`` (see :class:`GrowingLayer`) defaults to whether the config's attention is the
    engine's grouped attention, the one that masks the spare room."""
    if full_reads is None:
        from .attention import GROUPED

        full_reads = getattr(config, "_attn_implementation", None) == GROUPED
    cache = DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [GrowingLayer(full_reads=full_reads) if type(layer) is DynamicLayer else layer
                        for layer in layers]
    return cache


__all__ = ["GrowingLayer", "MIN_GROWTH", "growing_cache"]
