"""The layer-side adapter sites (model/slots.py's protocol): an adapted layer and the trainable
copies of a saved module.

`AdaptedLayer` swaps in for a target nn.Linear / nn.Embedding (HF peft's design): it keeps the
original as `base_layer` and holds any number of named adapters in a ModuleDict. Its output is

    y = base_layer(x) + sum over active, unmerged adapters a of a(x)

where each adapter returns its additive term (for LoRA (alpha/r) B A x); an adapter with an
`add_to(out, x)` method computes out + term itself (LoRA fuses it into one addmm). A scaling
adapter ((IA)³) says `scales = "input"` or `"output"` and multiplies instead:
y = base_layer(scale(x)) or scale(base_layer(x)). A patching adapter (selective methods) says
`patches` (the parameter names it changes) and `deltas()` ((name, delta) pairs): the base layer
runs on `delta.patched(param)` = θ₀ + Δ for each. Merging adds an adapter's ΔW into
base_layer.weight (or calls its `merge_into(base_layer)`); unmerging undoes it. `disabled` skips
every adapter, so the same module is also the frozen base model (a free DPO reference).
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.slots import AdapterSite, cast_call
from .errors import PeftError


class AdaptedLayer(AdapterSite):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        self.tied_elsewhere = False      # base weight shared with another module (a tied head)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` of a Linear keeps working
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.base_layer, nn.Embedding)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        run = [] if self.disabled else [self.adapters[n] for n in self.active if n not in self.merged]
        x_in = x
        for adapter in run:
            if getattr(adapter, "scales", None) == "input":
                x_in = cast_call(adapter, x_in)
        patches = [a for a in run if getattr(a, "patches", None)]
        if patches:              # selective methods: the base layer's own math on θ₀ + Δ
            params: dict[str, torch.Tensor] = {}
            for adapter in patches:
                for name, delta in adapter.deltas():
                    params[name] = delta.patched(params.get(name, getattr(self.base_layer, name)))
            out = torch.func.functional_call(self.base_layer, params, (x_in, *args), kwargs)
        else:
            out = self.base_layer(x_in, *args, **kwargs)                  # (..., out) or (B, T, d)
        for adapter in run:
            scales = getattr(adapter, "scales", None)
            if scales == "input" or getattr(adapter, "patches", None):
                continue
            if scales == "output":
                out = cast_call(adapter, out)
                continue
            add_to = getattr(adapter, "add_to", None)
            if add_to is not None and out.dtype == x.dtype == next(adapter.parameters()).dtype:
                out = add_to(out, x)                          # fused add (LoRA: one addmm)
                continue
            delta = cast_call(adapter, x)                     # a float32 adapter over a half base
            # In place: nn.Linear / nn.Embedding never save their output for backward, and this
            # saves one (..., out) allocation per adapted layer.
            out = out.add_(delta) if delta.dtype == out.dtype else out + delta.to(out.dtype)
        return out

    # ---- merging ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        for name in names:
            if name in self.merged:
                continue
            if self.tied_elsewhere:
                raise PeftError(f"cannot merge adapter {name!r} into a weight shared with another module "
                                "(a tied output head would change too); untie the weights first")
            adapter = self.adapters[name]
            if hasattr(adapter, "merge_into"):
                adapter.merge_into(self.base_layer)
            else:
                weight = self.base_layer.weight
                weight.add_(adapter.delta_weight().to(weight.dtype))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        for name in reversed(self.merged):
            adapter = self.adapters[name]
            if hasattr(adapter, "unmerge_from"):
                adapter.unmerge_from(self.base_layer)
            else:
                weight.sub_(adapter.delta_weight().to(weight.dtype))
        self.merged = []

    def unload(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"


class SavedModule(AdapterSite):
    """A module trained in full beside the adapters (a new task head): the frozen original plus one
    trainable copy per adapter name (a deep copy); the first active one runs unless disabled."""
    store = "copies"

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.copies][:1]

    def forward(self, *args, **kwargs):
        return (self.running() or [self.original_module])[0](*args, **kwargs)

    def unload(self) -> nn.Module:
        return self.copies[self.active[0]] if self.active else self.original_module


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
