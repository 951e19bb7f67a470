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

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import PeftError
from .registry import AdapterConfig, Method, SiteContext, register


class SparseDelta(nn.Module):
    """Δ on the parameter `patches` ("weight" or "bias") of its layer: `values` (k,) at the flat
    entries `index` (k,); `shape` is the parameter's shape (a missing bias counts as zeros)."""

    def __init__(self, patches: str, shape: tuple[int, ...], index: torch.Tensor, *, device=None, dtype=None):
        super().__init__()
        self.patches, self.shape = patches, tuple(shape)
        self.register_buffer("index", index.to(device=device, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(index.numel(), device=device, dtype=dtype))

    def patched(self, param: Optional[torch.Tensor]) -> torch.Tensor:
        """param + Δ (out of place: the base tensor is never written)."""
        base = param if param is not None else self.values.new_zeros(self.shape)
        flat = base.reshape(-1).index_add(0, self.index, self.values.to(base.dtype))
        return flat.view(self.shape)

    @torch.no_grad()
    def merge_into(self, layer: nn.Module) -> None:
        param = getattr(layer, self.patches)
        if param is None:                            # bitfit add_missing: the bias appears on merge
            param = nn.Parameter(self.values.new_zeros(self.shape), requires_grad=False)
            setattr(layer, self.patches, param)
        self._before = param.view(-1)[self.index].clone()      # unmerge restores these bitwise
        param.view(-1).index_add_(0, self.index, self.values.to(param.dtype))

    @torch.no_grad()
    def unmerge_from(self, layer: nn.Module) -> None:
        getattr(layer, self.patches).view(-1)[self.index] = self._before


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
        n, w = self.count_for(base, config, site), base.weight
        return SparseDelta("bias", (n,), torch.arange(n), device=w.device, dtype=w.dtype)

    def count_for(self, base: nn.Module, config: BitFitConfig, site: SiteContext) -> int:
        bias = getattr(base, "bias", None)      # a missing one (add_missing) has one entry per output
        return bias.numel() if bias is not None else base.out_features


# ---- PaFi ----------------------------------------------------------------------------------------

@dataclass
class PaFiConfig(AdapterConfig):
    density: Optional[float] = None        # fraction of the targeted weight entries
    count: Optional[int] = None            # or an exact number of entries

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.density is None) == (self.count is None):
            raise PeftError(f"density={self.density!r}, count={self.count!r}: give exactly one of the two")
        if self.density is not None and (not isinstance(self.density, (int, float)) or not 0 < self.density <= 1):
            raise PeftError(f"density={self.density!r}: expected a fraction in (0, 1]")
        if self.count is not None and (not isinstance(self.count, int) or isinstance(self.count, bool)
                                       or self.count <= 0):
            raise PeftError(f"count={self.count!r}: expected a positive integer")

    def budget(self, total: int) -> int:
        k = self.count if self.count is not None else max(1, math.floor(self.density * total))
        if k > total:
            raise PeftError(f"count={k}: the targeted weights hold only {total:,} entries")
        return k


def global_smallest(weights: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Flat indices, per tensor, of the k entries with the smallest |w| over all tensors together
    (exactly k: torch.topk breaks ties)."""
    flat = torch.cat([w.detach().abs().reshape(-1).float() for w in weights])
    chosen = torch.topk(flat, k, largest=False, sorted=False).indices.sort().values
    out, start = [], 0
    for w in weights:
        end = start + w.numel()
        inside = chosen[(chosen >= start) & (chosen < end)]
        out.append(inside - start)
        start = end
    return out


@register
class PaFi(Method):
    name = "pafi"
    config_class = PaFiConfig
    default_targets = "all-linear"

    def adapter_for(self, base: nn.Linear, config: PaFiConfig, site: SiteContext) -> nn.Module:
        if "index" not in site.shared:
            weights = [b.weight for b in site.bases]
            site.shared["index"] = global_smallest(weights, config.budget(sum(w.numel() for w in weights)))
        w = base.weight
        return SparseDelta("weight", tuple(w.shape), site.shared["index"][site.index], device=w.device, dtype=w.dtype)

    def count_for(self, base: nn.Linear, config: PaFiConfig, site: SiteContext) -> int:
        if site.index != 0:
            return 0
        total = sum(b.weight.numel() for b in site.bases)
        return config.budget(total)                   # the whole budget, counted once
