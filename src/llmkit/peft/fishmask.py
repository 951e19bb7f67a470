"""Selective methods that choose entries by the Fisher information of the training data (scores:
fisher.py), each a sparse delta (selective.py) on the targeted weights (default: every Linear but
the output head):

- `fishmask` (Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks"): the
  empirical Fisher F_j = Σ_{i=1..N} (∂ℓ_i/∂θ_j)² over N examples (per-example gradients, drawn from
  `num_batches` batches); keep the k entries with the largest F_j over all targets together, fixed
  for the whole run. Trainable: exactly k.
- `fish_dip` (Das et al. 2023, "Unified Low-Resource Sequence Labeling by Sample-Aware Dynamic
  Sparse Finetuning"): the same mask, recomputed every `update_every` = T steps from the current
  model θ₀ + Δ and, sample-aware, from the `top_examples` examples with the highest current loss.
  Each tensor keeps the number of entries the first (global) selection gave it, so the trainable
  shapes, optimizer state and checkpoints never change size; entries that leave the mask keep what
  they learned (frozen `settled` entries of the delta), entries that join start at Δ = 0 with
  zero optimizer state, and the entries that stay keep their values and moments.
- `child_tuning` (Xu et al. 2021, "Raise a Child in Large Language Model: Towards Effective and
  Generalizable Fine-tuning"):
    mode "F" (task-driven): Fisher F_j = Σ_b (∂L_b/∂θ_j)² over batches b (the paper's per-batch
      estimate); the child network is the top `density` fraction, fixed from the start;
    mode "D" (task-free): every entry is trainable, but each backward pass keeps each gradient
      entry with probability p_D and rescales it: g̃ = g ⊙ M / p_D, M ~ Bernoulli(p_D) (a fresh M
      per backward, from torch's RNG, so seeded runs repeat). Trainable: every targeted entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import PeftError
from .fisher import scores
from .registry import DataConfig, Method, SelectionConfig, SiteContext, register
from .selective import SparseDelta, global_budget, global_top
from .sparse_optim import remap_entries


@dataclass
class FisherConfig(SelectionConfig, DataConfig):
    per_example: bool = True       # empirical Fisher from per-example gradients (else per batch)


def fisher_selection(config: FisherConfig, site: SiteContext, method: str) -> list[torch.Tensor]:
    """Per site, the flat indices of the global top-k Fisher entries (computed once, at site 0)."""
    if "index" not in site.shared:
        weights = [b.weight for b in site.bases]
        fisher = scores(site.model, weights, config.batches, config.loss_fn, num_batches=config.num_batches,
                        per_example=config.per_example, method=method)
        site.shared["index"] = global_top(fisher, config.budget(sum(w.numel() for w in weights)))
    return site.shared["index"][site.index]


class FisherMethod(Method):
    """A fixed mask of the top-k Fisher entries (FishMask; Child-tuning_F; Fish-DiP's first mask)."""
    config_class = FisherConfig
    default_targets = "all-linear"
    needs_data = True

    def adapter_for(self, base: nn.Linear, config: FisherConfig, site: SiteContext) -> nn.Module:
        return SparseDelta.on(base, "weight", site, lambda: fisher_selection(config, site, self.name))

    def count_for(self, base: nn.Linear, config: FisherConfig, site: SiteContext) -> int:
        return global_budget(config, site)


@register
class FishMask(FisherMethod):
    name = "fishmask"


# ---- Fish-DiP ------------------------------------------------------------------------------------

@dataclass
class FishDipConfig(FisherConfig):
    update_every: int = 100                # T: steps between re-selections
    top_examples: Optional[int] = None     # the Fisher over the n highest-loss examples drawn (None: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every <= 0:
            raise PeftError(f"update_every={self.update_every!r}: expected a positive number of steps")
        if self.top_examples is not None and (not isinstance(self.top_examples, int) or self.top_examples <= 0):
            raise PeftError(f"top_examples={self.top_examples!r}: expected a positive number of examples or None")


@torch.no_grad()
def reselect(delta: SparseDelta, new_index: torch.Tensor, optimizer=None) -> int:
    """Move `delta` onto the sorted flat entries `new_index` (same count); return how many changed."""
    old, values = delta.index, delta.values.detach().clone()
    stay_new = torch.isin(new_index, old)                           # (k,) new entries already selected
    pos = torch.searchsorted(old, new_index[stay_new])              # their place in the old index
    leaving = ~torch.isin(old, new_index)
    settled_i = getattr(delta, "settled_index", old[:0])
    settled_v = getattr(delta, "settled_values", values[:0])
    settled_i = torch.cat([settled_i, old[leaving]])
    settled_v = torch.cat([settled_v, values[leaving]])
    fresh = values.new_zeros(values.shape)
    fresh[stay_new] = values[pos]
    joining = torch.isin(settled_i, new_index)                      # settled entries selected again
    if joining.any():
        where = torch.searchsorted(new_index, settled_i[joining])
        fresh[where] += settled_v[joining]
        settled_i, settled_v = settled_i[~joining], settled_v[~joining]
    keep = settled_v != 0                                           # nothing learned: nothing to keep
    delta.settle(settled_i[keep], settled_v[keep])
    remap_entries(optimizer, delta.values, fresh, gather=pos, scatter=stay_new.nonzero().squeeze(1))
    delta.index.copy_(new_index)
    return int((~stay_new).sum())


class FishDipCallback:
    """Every `update_every` steps: the Fisher of the current model, each tensor's top entries."""

    def __init__(self, handle):
        self.handle = handle

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        for name in self.handle.active:
            info = self.handle.adapters[name]
            if info.method != "fish_dip" or step % info.config.update_every:
                continue
            metrics["mask_changed"] = update_mask(self.handle, name, getattr(trainer, "optimizer", None))


def update_mask(handle, name: str, optimizer=None) -> float:
    """Re-select adapter `name`'s entries from the current model; the changed fraction."""
    config = handle.adapters[name].config
    sites = [(site, delta) for _, site, delta in handle.adapter_modules(name)]
    weights = [site.base_layer.weight for site, _ in sites]
    fisher = scores(handle.model, weights, config.batches, config.loss_fn, num_batches=config.num_batches,
                    per_example=config.per_example, top_examples=config.top_examples, method="fish_dip")
    changed = 0
    for (site, delta), f in zip(sites, fisher):
        new_index = torch.topk(f.reshape(-1), delta.count, sorted=False).indices.sort().values
        changed += reselect(delta, new_index, optimizer)
    return changed / max(1, sum(d.count for _, d in sites))


@register
class FishDip(FisherMethod):
    name = "fish_dip"
    config_class = FishDipConfig

    def callbacks(self, handle) -> list:
        return [FishDipCallback(handle)]


# ---- Child-tuning --------------------------------------------------------------------------------

@dataclass
class ChildTuningConfig(FisherConfig):
    mode: str = "F"                # "F": a fixed Fisher-chosen child; "D": a Bernoulli(p_d) gradient mask
    p_d: float = 0.3               # the keep probability of mode D
    per_example: bool = False      # mode F's Fisher: per batch, as the paper's

    def selects(self) -> bool:
        return self.mode == "F"

    def __post_init__(self) -> None:
        if self.mode not in ("F", "D"):
            raise PeftError(f"mode={self.mode!r}: expected 'F' (Fisher child) or 'D' (Bernoulli gradient mask)")
        super().__post_init__()
        if self.mode == "D" and (isinstance(self.p_d, bool) or not isinstance(self.p_d, (int, float))
                                 or not 0 < self.p_d <= 1):
            raise PeftError(f"p_d={self.p_d!r}: expected a keep probability in (0, 1]")


class BernoulliGradient(SparseDelta):
    """A dense delta whose gradient is g ⊙ M / p, M ~ Bernoulli(p) drawn afresh at each backward."""

    def __init__(self, *args, p: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.p = p
        self.values.register_hook(self._mask)

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(grad.shape, device=grad.device) < self.p                 # (numel,)
        return grad * keep / self.p


@register
class ChildTuning(FisherMethod):
    name = "child_tuning"
    config_class = ChildTuningConfig

    def adapter_for(self, base: nn.Linear, config: ChildTuningConfig, site: SiteContext) -> nn.Module:
        if config.mode == "F":
            return super().adapter_for(base, config, site)
        w = base.weight
        return BernoulliGradient("weight", tuple(w.shape), None, p=config.p_d, device=w.device, dtype=w.dtype)

    def count_for(self, base: nn.Linear, config: ChildTuningConfig, site: SiteContext) -> int:
        return super().count_for(base, config, site) if config.mode == "F" else base.weight.numel()
