"""Paged KV storage: per layer, keys and values live in fixed-size blocks of one shared tensor, and a
request reads its own through its block table (`blocks.BlockPool` hands out the tables).

    keys[layer]: (num_blocks, block_size, n_kv, head_dim)      values[layer]: the same

Token t of a request with table τ sits at keys[layer][τ[t // bs], t % bs], i.e. at flat slot
τ[t // bs] · bs + t % bs of the (num_blocks · bs, n_kv, hd) view. Slots first, heads second, so one
step's new tokens scatter with a single `index_copy_` over flat slots, and a request's context is an
`index_select` of whole blocks. `gather` builds one request's contiguous (n_kv, T, head_dim) keys
and values; `gather_tables` does it for a padded batch of tables at once (what attention reads).
"""
from __future__ import annotations

from typing import Sequence

import torch


class PagedKV:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def slots(self, table: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
        """Flat slot ids (T,) of token positions (T,) under a block table."""
        table_t = torch.as_tensor(list(table), dtype=torch.long, device=positions.device)
        return table_t[positions // self.block_size] * self.block_size + positions % self.block_size

    def write_slots(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (N, n_kv, head_dim) at flat slots (N,)."""
        flat = (self.num_blocks * self.block_size,) + tuple(self.keys[layer].shape[2:])
        self.keys[layer].view(flat).index_copy_(0, slots, k.to(self.keys[layer].dtype))
        self.values[layer].view(flat).index_copy_(0, slots, v.to(self.values[layer].dtype))

    def write(self, layer: int, table: Sequence[int], positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v (n_kv, T, head_dim) of tokens at `positions` (T,) of the request with `table`."""
        self.write_slots(layer, self.slots(table, positions), k.transpose(0, 1), v.transpose(0, 1))

    def gather_tables(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of R requests through their padded tables (R, max_blocks):
        (R, n_kv, max_blocks · block_size, head_dim) each; slots past a request's length hold junk
        that attention must mask."""
        R, nb = tables.shape
        flat = tables.reshape(-1)                                                    # (R * nb,)
        out = []
        for store in (self.keys[layer], self.values[layer]):
            blocks = store.index_select(0, flat)                                     # (R*nb, bs, nkv, hd)
            out.append(blocks.view(R, nb * self.block_size, *store.shape[2:]).transpose(1, 2))
        return out[0], out[1]                                                        # (R, nkv, L, hd)

    def gather(self, layer: int, table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's first `length` keys and values, contiguous: (n_kv, length, head_dim) each."""
        tables = torch.as_tensor([list(table)], dtype=torch.long, device=self.keys[layer].device)
        k, v = self.gather_tables(layer, tables)
        return k[0, :, :length], v[0, :, :length]
