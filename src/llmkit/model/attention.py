"""Multi-head attention (MHA, GQA, MQA) over torch's scaled_dot_product_attention.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_h) + M) V        (Vaswani et al., 2017)

GQA (Ainslie et al., 2023) shares each key/value head between n_heads / n_kv_heads query heads;
MQA is the case n_kv_heads = 1. The same module serves self-attention (causal or bidirectional)
and cross-attention (queries from the decoder, keys/values from the encoder).

Training on CPU with attention dropout takes `attention_with_dropout` (the same math, with
dropout.py's cheap keep mask) because SDPA has no fused CPU kernel with dropout; everything else
goes through SDPA.

Extension point for PEFT: `kv_prefix` (None by default) is a module called as
`kv_prefix(x) -> (k, v)` with x the attention input (B, T, d) and k, v each
(B, n_kv_heads, P, head_dim), or None for no prefix. The P prefix positions are prepended to the
keys and values of every forward pass and are always visible (prefix tuning, P-tuning v2, APT).
They are never written into the KV cache. A PEFT prefix (an AdapterSlot) acts as P past tokens:
the stack starts the real tokens' positions at P (transformer.py), as HF peft's past_key_values do.

A cache with `paged = True` (the inference engine's `infer.batch.PagedBatch`) takes the new queries,
keys and values whole through `cache.attend(layer, q, k, v)`: it owns the per-sequence masks, so
the flattened (1, N) batch of many sequences never meets `mask` / `is_causal` here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .dropout import fast_path, keep_mask
from .positions import apply_rope


class Attention(nn.Module):
    adapter_slots = {"kv_prefix": "prefix"}

    def __init__(self, config: ModelConfig, *, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.dim_per_head
        self.cross = cross
        self.causal = config.causal and not cross          # the stack sets its own
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=config.attn_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.attn_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.attn_out_bias)
        self.dropout = config.attn_dropout
        self.kv_prefix: Optional[nn.Module] = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)                       # (B, n, T, hd)

    def forward(
        self,
        x: torch.Tensor,                          # (B, T, d)
        *,
        mask: Optional[torch.Tensor] = None,      # additive, broadcastable to (B, nh, T, Tk)
        is_causal: bool = False,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
        memory: Optional[torch.Tensor] = None,    # cross-attention: encoder states (B, S, d)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)                               # (B, nh, T, hd)
        if self.cross:
            if cache is not None and layer in cache.cross:
                k, v = cache.cross[layer]
            else:
                k = self._heads(self.k_proj(memory), self.n_kv_heads)               # (B, nkv, S, hd)
                v = self._heads(self.v_proj(memory), self.n_kv_heads)
                if cache is not None:
                    cache.cross[layer] = (k, v)
        else:
            k = self._heads(self.k_proj(x), self.n_kv_heads)                        # (B, nkv, T, hd)
            v = self._heads(self.v_proj(x), self.n_kv_heads)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if getattr(cache, "paged", False):
                # The engine's paged cache (infer/batch.py): it writes k, v through the block tables
                # and runs attention per sequence over its own context.
                if self.kv_prefix is not None:
                    raise ValueError("the paged engine does not run prefix-tuning adapters (kv_prefix); "
                                     "use llmkit.generate for this model")
                out = cache.attend(layer, q, k, v)                                  # (1, nh, N, hd)
                return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            if cache is not None:
                k, v = cache.update(layer, k, v)                                    # (B, nkv, Tk, hd)

        prefix = self.kv_prefix(x) if self.kv_prefix is not None else None
        if prefix is not None:
            pk, pv = prefix                                                         # (B, nkv, P, hd)
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
            mask, is_causal = _mask_with_prefix(mask, is_causal, T, k.shape[2], pk.shape[2], q)

        if self.n_kv_heads != self.n_heads:
            # Repeat each key/value head for its query group. SDPA's enable_gqa would avoid the copy,
            # but on CPU it falls back to a kernel measured ~10x slower than this.
            k, v = repeat_kv(k, self.n_heads // self.n_kv_heads), repeat_kv(v, self.n_heads // self.n_kv_heads)
        p = self.dropout if self.training else 0.0
        if p and fast_path(q, p) and (mask is None or mask.dtype == q.dtype):
            out = attention_with_dropout(q, k, v, mask, is_causal, p)               # (B, nh, T, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                 dropout_p=p)                        # (B, nh, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)       # (B, T, nh*hd)
        return self.o_proj(out)


def attention_with_dropout(q, k, v, mask, is_causal: bool, p: float) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h) + M) with dropout on the probabilities, times V.

    The computation SDPA's math path does when CPU training has attention dropout (its fused
    kernels take no dropout there), written out so the probabilities get the cheap 16-bit keep
    mask of dropout.py and the 1 / (1 - p') scale lands on the output, (T, hd) per head, instead of
    the (T, Tk) probabilities. Masks are dtype-min, never -inf, so no row needs a NaN guard.
    q: (B, nh, T, hd), k/v: (B, nh, Tk, hd), mask: additive, broadcastable to (B, nh, T, Tk).
    """
    B, nh, T, hd = q.shape
    Tk = k.shape[2]
    q3, k3, v3 = q.reshape(B * nh, T, hd), k.reshape(B * nh, Tk, hd), v.reshape(B * nh, Tk, hd)
    if mask is None and is_causal:   # SDPA's convention: query i sees keys 0..i
        mask = torch.full((T, Tk), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu_(1)
    if mask is None:
        scores = torch.baddbmm(q3.new_empty(1, 1, 1), q3, k3.transpose(1, 2), beta=0.0, alpha=hd ** -0.5)
    else:            # the mask rides on the matmul as its additive input (broadcast over queries)
        mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mask3 = mask4.expand(B, nh, mask4.shape[2], Tk).reshape(B * nh, mask4.shape[2], Tk)
        scores = torch.baddbmm(mask3, q3, k3.transpose(1, 2), alpha=hd ** -0.5)   # (B*nh, T, Tk)
    probs = torch.softmax(scores, dim=-1)                                           # (B*nh, T, Tk)
    keep, scale = keep_mask(probs.shape, p, probs.device)
    out = torch.bmm(probs * keep, v3).mul_(scale)                                  # (B*nh, T, hd)
    return out.view(B, nh, T, hd)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * groups, T, hd), each kv head repeated for its query group."""
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, groups, T, hd).reshape(B, n_kv * groups, T, hd)


def _mask_with_prefix(mask, is_causal, q_len, kv_len, prefix_len, q):
    """Prepend `prefix_len` always-visible key columns to the mask (materialising it if needed)."""
    if mask is None and not is_causal:
        return None, False
    if mask is None:  # fused causal with no cache: build it explicitly, now that keys are offset
        visible = torch.ones(q_len, kv_len - prefix_len, dtype=torch.bool, device=q.device).tril()
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~visible, torch.finfo(q.dtype).min).view(1, 1, q_len, -1)
    pad = torch.zeros(*mask.shape[:-1], prefix_len, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1), False
