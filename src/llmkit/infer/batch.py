"""One engine step's view of the paged cache: what attention needs to run R sequences at once.

The engine flattens a step's work into one row of N tokens, (1, N): each scheduled sequence r
contributes its n_r new tokens (a prefill chunk, or 1 for a decode), at positions
c_r, …, c_r + n_r − 1 where c_r is how many of its tokens already have keys and values. All
token-wise layers (embeddings, projections, MLPs, norms, LoRA) see those N tokens with no padding.
The model core passes this object as `cache=`; because it says `paged = True`, the stack builds no
mask and `Attention` hands its (1, h, N, hd) queries, keys and values to `attend` instead of
`cache.update` (the seam the contiguous `KVCache` keeps for training and `generate()`).

`attend`, per layer:
  1. writes the N new keys / values to their slots (block table → flat slot, `paged.PagedKV`);
  2. reads each sequence's whole context through its block table, (R, n_kv, L, hd) with
     L = max_blocks · block_size;
  3. lays the queries out per sequence, (R, h, T_q, hd) with T_q = max n_r (for a pure decode step
     T_q = 1 and this is a reshape), and runs SDPA with the mask

        visible(r, j, k) = k ≤ c_r + j  [and k > c_r + j − window]      (ALiBi adds −slope·(c_r + j − k))

  4. puts the outputs back in the flat order, (1, h, N, hd).
Queries past a sequence's n_r (padding) see key 0 only, so no softmax row is empty.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..model.attention import repeat_kv
from .paged import PagedKV


class PagedBatch:
    paged = True
    length = 0                       # the stack's `past`: positions come from the engine instead

    def __init__(self, kv: PagedKV, tables: Sequence[Sequence[int]], computed: Sequence[int],
                 new: Sequence[int], *, sliding_window: Optional[int] = None,
                 alibi: Optional[Sequence[float]] = None,
                 device=None):
        """tables: each sequence's block table; computed: c_r; new: n_r (>= 1), in flat order.
        alibi: the ALiBi slopes of the heads this process computes (a tensor-parallel rank's share)."""
        self.kv = kv
        R, bs = len(new), kv.block_size
        max_blocks = max(len(t) for t in tables)
        padded = [list(t) + [t[0]] * (max_blocks - len(t)) for t in tables]   # pad with a real block id
        self.tables = torch.tensor(padded, dtype=torch.long, device=device)   # (R, max_blocks)
        c = torch.tensor(list(computed), dtype=torch.long, device=device)     # (R,)
        n = torch.tensor(list(new), dtype=torch.long, device=device)          # (R,)
        self.T_q = int(n.max())
        self.decode_only = self.T_q == 1
        row = torch.repeat_interleave(torch.arange(R, device=device), n)      # (N,) sequence of each token
        start = torch.cumsum(n, 0) - n                                        # (R,) first flat index per row
        offset = torch.arange(int(n.sum()), device=device) - start[row]      # (N,) j within the row
        self.positions = c[row] + offset                                      # (N,) absolute positions
        tables_per_token = self.tables[row]                                   # (N, max_blocks)
        self.slots = (tables_per_token.gather(1, (self.positions // bs)[:, None]).squeeze(1) * bs
                      + self.positions % bs)                                  # (N,) flat slot ids
        self.query_index = row * self.T_q + offset                            # (N,) into (R * T_q)
        self.R = R
        # The mask, shared by every layer: (R, 1, T_q, L)
        L = max_blocks * bs
        q_pos = c[:, None] + torch.arange(self.T_q, device=device)[None, :]   # (R, T_q)
        k_pos = torch.arange(L, device=device)                                # (L,)
        visible = k_pos[None, None, :] <= q_pos[:, :, None]                   # (R, T_q, L)
        if sliding_window is not None:
            visible &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        real_query = torch.arange(self.T_q, device=device)[None, :] < n[:, None]   # (R, T_q)
        visible &= real_query[:, :, None]
        visible[:, :, 0] |= ~real_query                                       # padding queries see key 0
        self.mask = visible[:, None]                                          # (R, 1, T_q, L) bool
        self.alibi = None
        if alibi is not None:
            slopes = torch.tensor(list(alibi), dtype=torch.float32, device=device)
            distance = (q_pos[:, :, None] - k_pos[None, None, :]).clamp(min=0).float()   # (R, T_q, L)
            bias = -slopes.view(1, -1, 1, 1) * distance[:, None]                         # (R, h, T_q, L)
            self.alibi = bias.masked_fill(~self.mask, torch.finfo(torch.float32).min)

    def update(self, layer, k, v):
        raise TypeError("a paged batch is read through attend(), not update(): the model core's "
                        "Attention checks `cache.paged`")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, h, N, hd), k / v (1, n_kv, N, hd) of the step's new tokens -> (1, h, N, hd)."""
        _, h, N, hd = q.shape
        self.kv.write_slots(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))   # (N, nkv, hd)
        keys, values = self.kv.gather_tables(layer, self.tables)                            # (R, nkv, L, hd)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if keys.shape[1] != h:
            keys, values = repeat_kv(keys, h // keys.shape[1]), repeat_kv(values, h // values.shape[1])
        flat_q = q[0].transpose(0, 1)                                                        # (N, h, hd)
        if self.decode_only:
            queries = flat_q.unsqueeze(2)                                                    # (R, h, 1, hd)
        else:
            queries = flat_q.new_zeros(self.R * self.T_q, h, hd).index_copy_(0, self.query_index, flat_q)
            queries = queries.view(self.R, self.T_q, h, hd).transpose(1, 2)                  # (R, h, T_q, hd)
        mask = self.mask if self.alibi is None else self.alibi.to(q.dtype)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)          # (R, h, T_q, hd)
        out = out.transpose(1, 2).reshape(self.R * self.T_q, h, hd)
        if not self.decode_only:
            out = out.index_select(0, self.query_index)                                      # (N, h, hd)
        return out.transpose(0, 1).unsqueeze(0)                                              # (1, h, N, hd)
