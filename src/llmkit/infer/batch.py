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
  2. decoding sequences (n_r = 1), all together: their contexts read through their block tables,
     (R_d, n_kv, L, hd) with L = max_blocks · block_size, and one SDPA call;
  3. prefilling sequences (n_r > 1), one SDPA call each over their own context, so a long chunk
     never pads the decodes' queries (nor they its keys);
  4. outputs back in the flat order, (1, h, N, hd).
The mask of query j of sequence r (position c_r + j) over key k is

    visible(r, j, k) = k ≤ c_r + j  [and k > c_r + j − window]      (ALiBi adds −slope_h · (c_r + j − k))

GQA without copying keys: the g = h / n_kv query heads that share a key/value head ride in SDPA's
query-length dimension, q (R, n_kv, g · n, hd) against k (R, n_kv, L, hd) (the head order of
`repeat_kv`: query head j·g + i reads kv head j). Measured on 2 CPU cores, 16 sequences x 512 keys:
0.36 ms per layer against 8.2 ms for repeat_kv + a boolean mask. Masks are additive floats in the
queries' dtype, built once per step (in the constructor) and shared by every layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .paged import PagedKV


class PagedBatch:
    paged = True
    length = 0                       # the stack's `past`: positions come from the engine instead

    def __init__(self, kv: PagedKV, tables: Sequence[Sequence[int]], computed: Sequence[int],
                 new: Sequence[int], *, heads: int, dtype: torch.dtype, sliding_window: Optional[int] = None,
                 alibi: Optional[Sequence[float]] = None, cut_single: bool = True, device=None):
        """tables: each sequence's block table; computed: c_r; new: n_r (>= 1), in flat order.
        heads: the query heads attention runs (a tensor-parallel rank's share); dtype: the queries'.
        alibi: the ALiBi slopes of those heads. cut_single: a lone decoding sequence reads its keys cut
        to its length with no mask (eager); a compiled step keeps the masked form, whose shapes
        change less. Everything attention needs is built here, once a
        step, so `attend` is plain tensor code (torch.compile traces it without guards on Python
        state)."""
        self.kv, self.window, self.device, self.dtype = kv, sliding_window, device, dtype
        self.alibi = None if alibi is None else torch.tensor(list(alibi), dtype=torch.float32, device=device)
        self.n_kv = kv.keys[0].shape[2]
        self.groups = heads // self.n_kv
        bs = kv.block_size
        starts, at = [], 0
        for n in new:
            starts.append(at)
            at += n
        slots = []
        for table, c, n in zip(tables, computed, new):
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)                # (N,)
        self.N = at
        decode = [r for r, n in enumerate(new) if n == 1]
        self.decode = None
        if decode:
            width = max(len(tables[r]) for r in decode)
            padded = [list(tables[r]) + [tables[r][0]] * (width - len(tables[r])) for r in decode]
            tokens = [starts[r] for r in decode]
            # one sequence, no window or bias: its keys cut to its length need no mask at all
            single = len(new) == 1 and sliding_window is None and alibi is None and cut_single
            q_pos = torch.tensor([[computed[r]] for r in decode], device=device)                   # (R_d, 1)
            self.decode = {"tables": torch.tensor(padded, dtype=torch.long, device=device),       # (R_d, nb)
                           "length": computed[0] + 1 if single else None,
                           "mask": None if single else self._mask(q_pos, width * bs),
                           "tokens": None if tokens == list(range(self.N)) else
                           torch.tensor(tokens, dtype=torch.long, device=device)}                 # (R_d,) flat
        self.prefill = []
        for r, n in enumerate(new):
            if n > 1:
                q_pos = (computed[r] + torch.arange(n, device=device))[None]                       # (1, n)
                self.prefill.append({"start": starts[r], "n": n, "mask": self._mask(q_pos, len(tables[r]) * bs),
                                     "table": torch.tensor([list(tables[r])], dtype=torch.long, device=device)})

    def update(self, layer, k, v):
        raise TypeError("a paged batch is read through attend(), not update(): the model core's "
                        "Attention checks `cache.paged`")

    def _mask(self, q_pos: torch.Tensor, length: int) -> torch.Tensor:
        """Additive mask (R, 1 | n_kv, groups · T, L) for queries at q_pos (R, T) over L key slots."""
        R, T = q_pos.shape
        n_kv, groups = self.n_kv, self.groups
        k_pos = torch.arange(length, device=self.device)
        visible = k_pos[None, None, :] <= q_pos[:, :, None]                                   # (R, T, L)
        if self.window is not None:
            visible &= k_pos[None, None, :] > q_pos[:, :, None] - self.window
        if self.alibi is None:
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~visible, float("-inf"))
            return mask[:, None].expand(R, groups, T, length).reshape(R, 1, groups * T, length)
        distance = (q_pos[:, :, None] - k_pos[None, None, :]).clamp(min=0).float()                # (R, T, L)
        bias = -self.alibi.view(1, n_kv, groups, 1, 1) * distance[:, None, None]                   # (R, nkv, g, T, L)
        bias = bias.masked_fill(~visible[:, None, None], float("-inf"))
        return bias.to(self.dtype).reshape(R, n_kv, groups * T, length)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, h, N, hd), k / v (1, n_kv, N, hd) of the step's new tokens -> (1, h, N, hd)."""
        _, h, N, hd = q.shape
        n_kv, g = k.shape[1], h // k.shape[1]
        self.kv.write_slots(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))   # (N, nkv, hd)
        flat_q = q[0].transpose(0, 1)                                                        # (N, h, hd)
        d = self.decode
        if d is not None and not self.prefill and d["tokens"] is None:     # a pure decode step: no scatter
            keys, values = self.kv.gather_tables(layer, d["tables"])                        # (R, nkv, L, hd)
            if d["length"] is not None:
                keys, values = keys[:, :, :d["length"]], values[:, :, :d["length"]]
            out = F.scaled_dot_product_attention(flat_q.reshape(N, n_kv, g, hd), keys.to(q.dtype),
                                                 values.to(q.dtype), attn_mask=d["mask"])   # (R, nkv, g, hd)
            return out.reshape(N, h, hd).transpose(0, 1).unsqueeze(0)                       # (1, h, N, hd)
        out = flat_q.new_empty(N, h, hd)
        if d is not None:
            keys, values = self.kv.gather_tables(layer, d["tables"])                        # (R_d, nkv, L, hd)
            R_d = keys.shape[0]
            od = F.scaled_dot_product_attention(flat_q.index_select(0, d["tokens"]).reshape(R_d, n_kv, g, hd),
                                                keys.to(q.dtype), values.to(q.dtype),
                                                attn_mask=d["mask"])                        # (R_d, nkv, g, hd)
            out.index_copy_(0, d["tokens"], od.reshape(R_d, h, hd))
        for p in self.prefill:
            n, s = p["n"], p["start"]
            keys, values = self.kv.gather_tables(layer, p["table"])                         # (1, nkv, L, hd)
            qp = flat_q[s:s + n].reshape(n, n_kv, g, hd).permute(1, 2, 0, 3).reshape(1, n_kv, g * n, hd)
            op = F.scaled_dot_product_attention(qp, keys.to(q.dtype), values.to(q.dtype),
                                                attn_mask=p["mask"])                        # (1, nkv, g*n, hd)
            out[s:s + n] = op.reshape(n_kv, g, n, hd).permute(2, 0, 1, 3).reshape(n, h, hd)
        return out.transpose(0, 1).unsqueeze(0)                                             # (1, h, N, hd)
