"""Selective PEFT: train a chosen subset of the existing weights, θ' = θ₀ + Δ with Δ nonzero only
on the selected entries, kept as a sparse delta so the promise of the method holds end to end:

- the base tensor stays frozen and bitwise unchanged; the trainable parameter is `values` (k,),
  scattered onto the flat entries `index` (k,) at every forward, W_eff = W₀ + scatter(index, values).
  Whatever the optimizer does (AdamW's momentum, weight decay), it can only move the k values:
  a masked-out entry is θ₀ exactly. A plain PyTorch loop over `requires_grad` parameters is enough.
- optimizer state is (k,) per tensor, not the weight's shape;
- saving writes `index` and `values` (size ∝ k); loading and merging (W₀.index_add_) reproduce the
  fine-tuned tensor bitwise, since both compute the same float sums; unmerging puts the k saved
  base entries back, bitwise.

Methods (registry keys):
- `bitfit` (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
  Transformer-based Masked Language-models"): every bias term trains, nothing else,
  b' = b₀ + Δb. A model without biases (Llama) is an error unless `add_missing=True`, which trains
  zero-initialised biases in the Linear layers. Trainable: the targeted bias entries.
- `pafi` (Liao et al. 2023, "Parameter-Efficient Fine-Tuning without Introducing New Latency"):
  a fixed mask, chosen before training, of the k entries with the smallest |θ₀| over all targeted
  weights together (k = `count`, or `density` × their size). Trainable: exactly k.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import PeftError
from .registry import AdapterConfig, Method, SelectionConfig, SiteContext, register


class SparseDelta(nn.Module):
    """Δ on the parameter `patches` ("weight" or "bias") of its layer: `values` (k,) at the flat
    entries `index` (k,), or, with `index=None`, a dense Δ over the whole tensor (`values` has its
    numel; methods that select everything in their targets: cross-attention tuning,
    Child-tuning_D). `shape` is the parameter's shape (a missing bias counts as zeros).

    Entries a dynamic selection has let go (Fish-DiP) keep what they learned as frozen buffers
    `settled_index` / `settled_values`, so re-selecting never loses an update."""

    def __init__(self, patches: str, shape: tuple[int, ...], index: Optional[torch.Tensor], *, device=None,
                 dtype=None):
        super().__init__()
        self.patches, self.shape = patches, tuple(shape)
        k = math.prod(self.shape) if index is None else index.numel()
        self.index: Optional[torch.Tensor]
        if index is None:
            self.index = None
        else:
            self.register_buffer("index", index.to(device=device, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))

    @classmethod
    def on(cls, base: nn.Module, patches: str, site: SiteContext, select) -> "SparseDelta":
        """The delta for `base.<patches>` at `site`: its index from the saved file when loading
        (`site.saved`), else `select()` (flat indices, or None for every entry)."""
        param = getattr(base, patches, None)
        ref = base.weight
        shape = tuple(param.shape) if param is not None else (base.out_features,)
        saved = site.saved
        index = (saved.get("index") if saved is not None else select())
        delta = cls(patches, shape, index, device=ref.device, dtype=ref.dtype)
        if saved is not None and "settled_index" in saved:
            delta.settle(saved["settled_index"], saved["settled_values"])
        return delta

    def deltas(self) -> list[tuple[str, "SparseDelta"]]:
        return [(self.patches, self)]

    @property
    def count(self) -> int:
        return self.values.numel()

    def settle(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Set the frozen, already-learned entries (buffers, saved with the delta)."""
        self.register_buffer("settled_index", index.to(self.values.device, torch.long).clone())
        self.register_buffer("settled_values", values.detach().to(self.values).clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a resumed Fish-DiP run: the settled set has the size it had when the checkpoint was written
        key = prefix + "settled_index"
        if key in state_dict and (getattr(self, "settled_index", None) is None
                                  or self.settled_index.shape != state_dict[key].shape):
            self.settle(state_dict[key], state_dict[prefix + "settled_values"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delta_flat(self, base: torch.Tensor) -> torch.Tensor:
        """base.reshape(-1) + Δ, out of place (the base tensor is never written)."""
        flat = base.reshape(-1)
        values = self.values.to(base.dtype)
        flat = flat + values if self.index is None else flat.index_add(0, self.index, values)
        if getattr(self, "settled_index", None) is not None and self.settled_index.numel():
            flat = flat.index_add(0, self.settled_index, self.settled_values.to(base.dtype))
        return flat

    def patched(self, param: Optional[torch.Tensor]) -> torch.Tensor:
        """param + Δ."""
        base = param if param is not None else self.values.new_zeros(self.shape)
        return self.delta_flat(base).view(self.shape)

    @torch.no_grad()
    def merge_into(self, layer: nn.Module) -> None:
        param = getattr(layer, self.patches)
        if param is None:                            # bitfit add_missing: the bias appears on merge
            param = nn.Parameter(self.values.new_zeros(self.shape), requires_grad=False)
            setattr(layer, self.patches, param)
        new = self.patched(param).reshape(-1)       # the same float sums as the forward: bitwise
        flat, touched = param.view(-1), self.touched()
        if touched is None:                          # dense: the whole tensor changes
            self._before = param.detach().clone()
            param.copy_(new.view(self.shape))
        else:                                        # sparse: keep and write only the k entries
            self._before = flat[touched].clone()
            flat[touched] = new[touched]

    @torch.no_grad()
    def unmerge_from(self, layer: nn.Module) -> None:
        param, touched = getattr(layer, self.patches), self.touched()
        if touched is None:
            param.copy_(self._before)
        else:
            param.view(-1)[touched] = self._before
        del self._before

    def touched(self) -> Optional[torch.Tensor]:
        """The flat entries Δ changes (None: every entry)."""
        if self.index is None:
            return None
        settled = getattr(self, "settled_index", None)
        return self.index if settled is None or not settled.numel() else torch.cat([self.index, settled])


class DeltaSet(nn.Module):
    """Deltas on several parameters of one layer (weight and bias of a cross-attention projection),
    one adapter: `deltas` maps the parameter name to its SparseDelta."""

    def __init__(self, deltas: dict[str, SparseDelta]):
        super().__init__()
        self.parts = nn.ModuleDict(deltas)
        self.patches = "+".join(deltas)

    @classmethod
    def on(cls, base: nn.Module, site: SiteContext, select: dict) -> "DeltaSet":
        """`select`: parameter name -> a selection function, as SparseDelta.on takes."""
        parts = {}
        for name, chooser in select.items():
            prefix = f"parts.{name}."
            saved = None if site.saved is None else {k[len(prefix):]: v for k, v in site.saved.items()
                                                      if k.startswith(prefix)}
            parts[name] = SparseDelta.on(base, name, dataclasses.replace(site, saved=saved), chooser)
        return cls(parts)

    def deltas(self) -> list[tuple[str, SparseDelta]]:
        return list(self.parts.items())

    def merge_into(self, layer: nn.Module) -> None:
        for delta in self.parts.values():
            delta.merge_into(layer)

    def unmerge_from(self, layer: nn.Module) -> None:
        for delta in self.parts.values():
            delta.unmerge_from(layer)


# ---- BitFit --------------------------------------------------------------------------------------

@dataclass
class BitFitConfig(AdapterConfig):
    add_missing: bool = False              # a Linear without a bias gets a zero-initialised one


@register
class BitFit(Method):
    name = "bitfit"
    config_class = BitFitConfig
    default_targets = None
    layer_types = (nn.Linear, nn.LayerNorm)
    needs = ("layers with a bias (nn.Linear, nn.LayerNorm); a model without biases (Llama) takes "
             "add_missing=True to train zero-initialised biases in its Linear layers")

    def accepts(self, module: nn.Module, config: Optional[BitFitConfig] = None) -> bool:
        if not isinstance(module, self.layer_types):
            return False
        return getattr(module, "bias", None) is not None or (
            config is not None and config.add_missing and isinstance(module, nn.Linear))

    def adapter_for(self, base: nn.Module, config: BitFitConfig, site: SiteContext) -> nn.Module:
        return SparseDelta.on(base, "bias", site, lambda: None)      # every bias entry: a dense delta

    def count_for(self, base: nn.Module, config: BitFitConfig, site: SiteContext) -> int:
        bias = getattr(base, "bias", None)      # a missing one (add_missing) has one entry per output
        return bias.numel() if bias is not None else base.out_features


# ---- PaFi ----------------------------------------------------------------------------------------

def global_top(scores: list[torch.Tensor], k: int, largest: bool = True) -> list[torch.Tensor]:
    """Flat indices, per tensor, of the k entries with the largest (or smallest) score over all
    tensors together: exactly k (torch.topk breaks ties), sorted within each tensor."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    chosen = torch.topk(flat, k, largest=largest, sorted=False).indices.sort().values
    out, start = [], 0
    for w in scores:
        end = start + w.numel()
        inside = chosen[(chosen >= start) & (chosen < end)]
        out.append(inside - start)
        start = end
    return out


def global_budget(config: SelectionConfig, site: SiteContext) -> int:
    """A budget taken over every targeted weight together, counted once (at site 0)."""
    if site.index != 0:
        return 0
    return config.budget(sum(b.weight.numel() for b in site.bases))


@register
class PaFi(Method):
    name = "pafi"
    config_class = SelectionConfig
    default_targets = "all-linear"

    def adapter_for(self, base: nn.Linear, config: SelectionConfig, site: SiteContext) -> nn.Module:
        def select():
            if "index" not in site.shared:
                weights = [b.weight.abs() for b in site.bases]
                site.shared["index"] = global_top(weights, config.budget(sum(w.numel() for w in weights)),
                                                  largest=False)
            return site.shared["index"][site.index]
        return SparseDelta.on(base, "weight", site, select)

    def count_for(self, base: nn.Linear, config: SelectionConfig, site: SiteContext) -> int:
        return global_budget(config, site)
