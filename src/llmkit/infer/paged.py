"""Paged KV storage: per layer, keys and values live in fixed-size blocks of one shared tensor, and a
request reads its own through its block table (`blocks.BlockPool` hands out the tables).

    keys[layer]: (num_blocks, n_kv, block_size, head_dim)      values[layer]: the same

Token t of a request with table τ sits at keys[layer][τ[t // bs], :, t % bs]. `write` scatters new
tokens to their slots; `gather` builds a request's contiguous (n_kv, T, head_dim) keys and values,
so attention over them equals attention over a contiguous cache (the engine's paged attention
starts from this exact form).
"""
from __future__ import annotations

from typing import Sequence

import torch


class PagedKV:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.block_size = block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def _slots(self, table: Sequence[int], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, offsets), each (T,), of token positions (T,) under a block table."""
        table_t = torch.as_tensor(list(table), dtype=torch.long, device=positions.device)
        return table_t[positions // self.block_size], positions % self.block_size

    def write(self, layer: int, table: Sequence[int], positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v (n_kv, T, head_dim) of tokens at `positions` (T,) of the request with `table`."""
        blocks, offsets = self._slots(table, positions)
        self.keys[layer][blocks, :, offsets] = k.transpose(0, 1).to(self.keys[layer].dtype)      # (T, n_kv, hd)
        self.values[layer][blocks, :, offsets] = v.transpose(0, 1).to(self.values[layer].dtype)

    def gather(self, layer: int, table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's first `length` keys and values, contiguous: (n_kv, length, head_dim) each."""
        positions = torch.arange(length, device=self.keys[layer].device)
        blocks, offsets = self._slots(table, positions)
        return (self.keys[layer][blocks, :, offsets].transpose(0, 1),                              # (n_kv, T, hd)
                self.values[layer][blocks, :, offsets].transpose(0, 1))
