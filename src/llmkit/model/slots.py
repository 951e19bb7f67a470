"""Adapter sites: the protocol every PEFT container follows, and `AdapterSlot`, the one behind a
model's extension points.

A site holds named adapters (the ModuleDict named by `store`), the names that run (`active`) and
an off switch (`disabled`); `unload()` is what stays in the model without PEFT. A host module
lists its extension points in `adapter_slots` (name -> combine rule), each None until filled:

- "serial":   x -> a_k(... a_1(x))                      (Block.post_attn_adapter, post_mlp_adapter)
- "parallel": h -> Σ_i a_i(h)                           (Block.parallel_attn, parallel_mlp)
- "prefix":   B -> (cat_i k_i, cat_i v_i) on the P axis (Attention.kv_prefix; (B, n_kv, P, hd))

A parallel or prefix slot with nothing running returns None and its host adds nothing, so a
disabled slot leaves the host's output bitwise unchanged. A new slot: an attribute, an entry in
its host's `adapter_slots`, the call in the host's forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class AdapterSite(nn.Module):
    store = "adapters"

    def __init__(self):
        super().__init__()
        self.active: list[str] = []
        self.disabled = False

    @property
    def named(self) -> nn.ModuleDict:
        return getattr(self, self.store)

    def running(self) -> list[nn.Module]:
        return [] if self.disabled else [self.named[n] for n in self.active]

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.named]

    def unload(self) -> Optional[nn.Module]:
        raise NotImplementedError


class AdapterSlot(AdapterSite):
    def __init__(self, combine: str):
        super().__init__()
        if combine not in ("serial", "parallel", "prefix"):
            raise ValueError(f"combine={combine!r}: expected 'serial', 'parallel' or 'prefix'")
        self.combine = combine
        self.adapters = nn.ModuleDict()

    def forward(self, x):
        run = self.running()
        if self.combine == "serial":
            for adapter in run:
                x = cast_call(adapter, x)
            return x
        if not run:
            return None
        outs = [cast_call(adapter, x) for adapter in run]
        if self.combine == "parallel":
            return sum(outs[1:], outs[0])                                            # (B, T, d)
        return tuple(torch.cat(parts, dim=2) for parts in zip(*outs))                # (B, n_kv, ΣP, hd) x 2

    def unload(self) -> Optional[nn.Module]:
        """The one active adapter as a plain slot module, None when none, else the slot itself."""
        return self.named[self.active[0]] if len(self.active) == 1 else (self if self.active else None)


def cast_call(adapter: nn.Module, x):
    """adapter(x), with a float32 adapter on a half-precision model run in float32 and cast back."""
    p = next(adapter.parameters(), None)
    if p is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or p.dtype == x.dtype:
        return adapter(x)
    return adapter(x.to(p.dtype)).to(x.dtype)
