"""Adapter sites: the protocol every PEFT container follows, and `AdapterSlot`, the one behind a
model's extension points.

A site holds named adapters (the ModuleDict named by `store`), the names that run (`active`) and
an off switch (`disabled`); `unload()` is what stays in the model without PEFT. A host module
lists its extension points in `adapter_slots` (name -> combine rule), each None until filled:

- "serial":   x -> a_k(... a_1(x))                      (Block.post_attn_adapter, post_mlp_adapter)
- "parallel": h -> Σ_i a_i(h)                           (Block.parallel_attn, parallel_mlp)
- "prefix":   x -> (cat_i k_i, cat_i v_i) on the P axis (Attention.kv_prefix; x is the attention
              input (B, T, d), k and v are (B, n_kv, P, hd))
- "prompt":   B -> cat_i e_i on the p axis (Transformer.input_prompt; (B, p, d) virtual tokens)
- "route":    (h, sublayer) -> a_1(h, sublayer) (Block.route_attn, route_mlp: the one running
              adapter decides which tokens the frozen sublayer sees, CoDA)

A parallel, prefix or prompt slot with nothing running returns None and its host adds nothing,
so a disabled slot leaves the host's output bitwise unchanged; a route slot with nothing running
runs the sublayer on every token. Prefix and prompt adapters have a `length` (their virtual
positions); `virtual_length()` sums it over the running ones. A new slot: an attribute, an entry
in its host's `adapter_slots`, the call in the host's forward.
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


COMBINES = ("serial", "parallel", "prefix", "prompt", "route")


def virtual_length(slot: Optional[nn.Module]) -> int:
    """The virtual positions a filled prefix / prompt slot adds; 0 for None or a hand-set module."""
    return slot.virtual_length() if isinstance(slot, AdapterSlot) else 0


class AdapterSlot(AdapterSite):
    def __init__(self, combine: str):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r}: expected one of {list(COMBINES)}")
        self.combine = combine
        self.adapters = nn.ModuleDict()

    def forward(self, x, sublayer=None):
        run = self.running()
        if self.combine == "serial":
            for adapter in run:
                x = cast_call(adapter, x)
            return x
        if self.combine == "route":
            if len(run) > 1:
                raise ValueError(f"a route slot runs one adapter at a time; active: {self.active}")
            return run[0](x, sublayer) if run else sublayer(x)
        if not run:
            return None
        outs = [cast_call(adapter, x) for adapter in run]
        if self.combine == "parallel":
            return sum(outs[1:], outs[0])                                            # (B, T, d)
        if self.combine == "prompt":
            return torch.cat(outs, dim=1)                                            # (B, Σp, d)
        return tuple(torch.cat(parts, dim=2) for parts in zip(*outs))                # (B, n_kv, ΣP, hd) x 2

    def virtual_length(self) -> int:
        """Positions the running prefix / prompt adapters add (0 for other slots)."""
        return sum(getattr(adapter, "length", 0) for adapter in self.running())

    def unload(self) -> Optional[nn.Module]:
        """The one active adapter as a plain slot module, None when none, else the slot itself."""
        return self.named[self.active[0]] if len(self.active) == 1 else (self if self.active else None)


def cast_call(adapter: nn.Module, x):
    """adapter(x), with a float32 adapter on a half-precision model run in float32 and cast back
    (a tuple output, a prefix's (k, v), cast back element-wise)."""
    p = next(adapter.parameters(), None)
    if p is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or p.dtype == x.dtype:
        return adapter(x)
    out = adapter(x.to(p.dtype))
    return tuple(o.to(x.dtype) for o in out) if isinstance(out, tuple) else out.to(x.dtype)
