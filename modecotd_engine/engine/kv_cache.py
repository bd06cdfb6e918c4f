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
    concatenating; same results, same API."""

    keys = _stored("_keys")
    values = _stored("_values")

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
            grown = new.new_empty(*new.shape[:-2], max(need, n + max(n // 2, MIN_GROWTH)), new.shape[-1])
            if n:
                grown[..., :n, :] = buf[..., :n, :]
            buf = grown
        buf[..., n:need, :] = new
        self.__dict__[name] = (buf, need)
        return buf[..., :need, :]


def growing_cache(config) -> DynamicCache:
    """``DynamicCache(config=config)`` with every plain full-attention layer a :class:`GrowingLayer`
    (sliding-window and other layer kinds are kept as transformers makes them)."""
    cache = DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


__all__ = ["GrowingLayer", "MIN_GROWTH", "growing_cache"]
