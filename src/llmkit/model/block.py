"""One transformer layer: self-attention, optional cross-attention, feed-forward, residuals.

Pre-norm (GPT-2, Llama):   x = x + Attn(N1(x));  x = x + FFN(N2(x))
Post-norm (BERT, BART):    x = N1(x + Attn(x));  x = N2(x + FFN(x))
Parallel residual (GPT-J): x = x + Attn(N1(x)) + FFN(N2(x))

Extension points for PEFT (`adapter_slots`, combine rules in slots.py), None by default, each
an `nn.Module` set as an attribute (PEFT puts an `AdapterSlot` there):
- `post_attn_adapter(a) -> a'`: transforms the attention output before the residual add
  (serial adapters, Houlsby et al. 2019).
- `post_mlp_adapter(m) -> m'`: the same after the feed-forward output (Pfeiffer adapters).
- `parallel_attn(h) -> delta` / `parallel_mlp(h) -> delta`: a branch fed the sublayer's input
  whose output (unless None) is added to the sublayer's output (parallel adapters, He et al. 2022).
- `route_attn(h, sublayer) -> out` / `route_mlp(h, sublayer) -> out`: replaces the sublayer call;
  the slot decides which tokens `sublayer(h_selected, index)` runs on (CoDA, Lei et al. 2023).
  `index` (B, k) holds sorted token positions; the attention mask and rotary tables are gathered
  to them. Only bidirectional stacks take it (`causal` is set by the stack).
- `Attention.kv_prefix`: see attention.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .dropout import Dropout
from .mlp import MLP
from .norms import build_norm


class Block(nn.Module):
    adapter_slots = {"post_attn_adapter": "serial", "post_mlp_adapter": "serial",
                     "parallel_attn": "parallel", "parallel_mlp": "parallel",
                     "route_attn": "route", "route_mlp": "route"}

    def __init__(self, config: ModelConfig, *, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.parallel_residual = config.parallel_residual
        self.attn_norm = build_norm(config)
        self.self_attn = Attention(config)
        self.cross_attn: Optional[Attention] = None
        if cross_attention:
            self.cross_attn_norm = build_norm(config)
            self.cross_attn = Attention(config, cross=True)
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config)
        self.dropout = Dropout(config.dropout)     # applied fused with each residual add
        self.post_attn_adapter: Optional[nn.Module] = None
        self.post_mlp_adapter: Optional[nn.Module] = None
        self.parallel_attn: Optional[nn.Module] = None
        self.parallel_mlp: Optional[nn.Module] = None
        self.route_attn: Optional[nn.Module] = None
        self.route_mlp: Optional[nn.Module] = None
        self.causal = config.causal                   # the stack sets its own (BART's encoder: False)

    def _attend(self, h: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.route_attn is None:
            out = self.self_attn(h, **attn_kwargs)
        else:
            out = self.route_attn(h, lambda x, index=None: self.self_attn(x, **_gathered(attn_kwargs, index)))
        return _adapt(out, h, self.parallel_attn, self.post_attn_adapter)

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(h) if self.route_mlp is None else self.route_mlp(h, lambda x, index=None: self.mlp(x))
        return _adapt(out, h, self.parallel_mlp, self.post_mlp_adapter)

    def _cross(self, x, memory, memory_mask, cache, layer):
        return self.cross_attn(x, mask=memory_mask, memory=memory, cache=cache, layer=layer)

    def forward(
        self,
        x: torch.Tensor,                              # (B, T, d)
        *,
        mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        rope=None,
        cache=None,
        layer: int = 0,
        memory: Optional[torch.Tensor] = None,        # encoder states for cross-attention
        memory_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        attn_kwargs = dict(mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer)
        add = self.dropout.add                        # residual + dropout(sublayer), one pass
        if self.pre_norm:
            if self.parallel_residual:
                attn = self._attend(self.attn_norm(x), **attn_kwargs)
                return add(add(x, attn), self._feed_forward(self.mlp_norm(x)))
            x = add(x, self._attend(self.attn_norm(x), **attn_kwargs))
            if self.cross_attn is not None:
                x = add(x, self._cross(self.cross_attn_norm(x), memory, memory_mask, cache, layer))
            return add(x, self._feed_forward(self.mlp_norm(x)))
        x = self.attn_norm(add(x, self._attend(x, **attn_kwargs)))
        if self.cross_attn is not None:
            x = self.cross_attn_norm(add(x, self._cross(x, memory, memory_mask, cache, layer)))
        return self.mlp_norm(add(x, self._feed_forward(x)))


def _gathered(attn_kwargs: dict, index: Optional[torch.Tensor]) -> dict:
    """Attention arguments for the tokens at `index` (B, k) only: mask rows/columns and rotary
    tables gathered. A KV cache cannot follow a routed subset, so routing refuses one."""
    if index is None:
        return attn_kwargs
    if attn_kwargs.get("cache") is not None:
        raise ValueError("a routed attention sublayer (CoDA) cannot run with a KV cache")
    out = dict(attn_kwargs)
    mask = attn_kwargs.get("mask")
    if mask is not None:                                                   # (B|1, h|1, Tq|1, Tk)
        B, k = index.shape
        mask = mask.expand(B, *mask.shape[1:])
        cols = index[:, None, None, :].expand(B, mask.shape[1], mask.shape[2], k)
        mask = mask.gather(3, cols)                                        # (B, h, Tq|1, k)
        if mask.shape[2] > 1:
            rows = index[:, None, :, None].expand(B, mask.shape[1], k, k)
            mask = mask.gather(2, rows)                                    # (B, h, k, k)
        out["mask"] = mask
    rope = attn_kwargs.get("rope")
    if rope is not None:                                                   # (B|1, 1, T, hd) each
        out["rope"] = tuple(t.expand(index.shape[0], *t.shape[1:]).gather(
            2, index[:, None, :, None].expand(index.shape[0], 1, index.shape[1], t.shape[-1])) for t in rope)
    return out


def _adapt(out: torch.Tensor, h: torch.Tensor, parallel: Optional[nn.Module], serial: Optional[nn.Module]):
    """serial(out + parallel(h)) for a sublayer output `out` (B, T, d) of input `h`, absent slots skipped."""
    delta = parallel(h) if parallel is not None else None
    out = out if delta is None else out + delta
    return serial(out) if serial is not None else out
