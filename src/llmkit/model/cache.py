"""`KVCache`: keys and values of past tokens, so incremental decoding costs O(T) per step, not O(T^2).

Buffers are preallocated and grown by doubling, so a decoding step writes in place instead of
concatenating a new tensor every step. Each layer keeps its own fill level: a forward pass writes
layer by layer, and `length` reads layer 0.
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.keys: list[Optional[torch.Tensor]] = []     # per layer: (B, n_kv, capacity, hd)
        self.values: list[Optional[torch.Tensor]] = []
        self.lengths: list[int] = []
        # Encoder-decoder models: cross-attention keys/values, computed once from the encoder.
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        """Number of tokens already stored (as seen by layer 0)."""
        return self.lengths[0] if self.lengths else 0

    def _ensure_layer(self, layer: int) -> None:
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
            self.lengths.append(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, n_kv, T, hd) for `layer`; return all keys/values so far (views)."""
        self._ensure_layer(layer)
        start, new = self.lengths[layer], k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is not None and start and buf_k.shape[0] != k.shape[0]:
            raise ValueError(f"KVCache holds a batch of {buf_k.shape[0]} rows; got {k.shape[0]}. "
                             "Call reorder(batch_index) to change the batch of a filled cache.")
        if buf_k is None or start + new > buf_k.shape[2] or buf_k.shape[0] != k.shape[0]:
            # Double on overflow, so appending n tokens one by one costs O(log n) copies.
            old_capacity = buf_k.shape[2] if buf_k is not None else 0
            capacity = max(self.capacity, start + new, 2 * old_capacity)
            grown_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            grown_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if start:
                grown_k[:, :, :start] = buf_k[:, :, :start]
                grown_v[:, :, :start] = buf_v[:, :, :start]
            buf_k, buf_v = grown_k, grown_v
            self.keys[layer], self.values[layer] = buf_k, buf_v
        buf_k[:, :, start:start + new] = k
        buf_v[:, :, start:start + new] = v
        self.lengths[layer] = start + new
        return buf_k[:, :, : start + new], buf_v[:, :, : start + new]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (e.g. rejected speculative tokens)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Keep only (or repeat) the given batch rows, e.g. after some sequences finished."""
        self.keys = [k.index_select(0, batch_index) if k is not None else None for k in self.keys]
        self.values = [v.index_select(0, batch_index) if v is not None else None for v in self.values]
        self.cross = {i: (k.index_select(0, batch_index), v.index_select(0, batch_index))
                      for i, (k, v) in self.cross.items()}
