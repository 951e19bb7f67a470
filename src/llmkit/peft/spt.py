"""SPT, sensitivity-aware parameter-efficient tuning (He et al. 2023, "Sensitivity-Aware Visual
Parameter-Efficient Fine-Tuning"). The sensitivity of entry j is the first-order Taylor estimate of
the loss change when it is tuned, summed over N batches (fisher.py):

    s_j = Σ_b |∂L_b/∂θ_j · θ_j|

With a total budget of B trainable parameters (`density` × the targeted entries, or `count`):
1. take the B most sensitive entries over all targeted weights; n_i of them fall in matrix i;
2. a matrix with many sensitive entries - n_i ≥ max(in_i + out_i, lora_threshold · in_i · out_i) -
   is tuned structurally instead, by LoRA of rank r_i = ⌊n_i / (in_i + out_i)⌋ (r_i (in_i + out_i)
   parameters, ΔW = B A, B = 0 at init);
3. the budget left, B − Σ r_i (in_i + out_i), goes to the most sensitive entries of the other
   matrices (unstructured: sparse deltas, selective.py).
So the trainable parameters fill the budget exactly. Trainable: exactly B.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PeftError
from .fisher import scores
from .lora import LoraAdapter
from .registry import DataConfig, Method, SelectionConfig, SiteContext, register
from .selective import SparseDelta, global_budget, global_top


@dataclass
class SptConfig(SelectionConfig, DataConfig):
    lora_threshold: float = 0.1        # the share of a matrix's entries above which it gets LoRA

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.lora_threshold, (int, float)) or not 0 <= self.lora_threshold <= 1:
            raise PeftError(f"lora_threshold={self.lora_threshold!r}: expected a fraction in [0, 1]")


def plan(weights: list[torch.Tensor], sensitivity: list[torch.Tensor], budget: int, threshold: float) -> list:
    """Per matrix ("lora", rank) or ("sparse", flat indices), filling `budget` exactly."""
    top = global_top(sensitivity, budget)
    out: list = [None] * len(weights)
    used = 0
    for i, (w, chosen) in enumerate(zip(weights, top)):
        rows, cols = w.shape
        n = chosen.numel()
        if n >= max(rows + cols, threshold * w.numel()):
            out[i] = ("lora", n // (rows + cols))
            used += out[i][1] * (rows + cols)
    sparse = [i for i, p in enumerate(out) if p is None]
    rest = budget - used
    room = sum(weights[i].numel() for i in sparse)
    if rest > room:
        raise PeftError(f"spt: {rest:,} parameters of the budget are left after LoRA and the other matrices "
                        f"hold only {room:,} entries; lower density/count or raise lora_threshold")
    picked = global_top([sensitivity[i] for i in sparse], rest) if sparse else []
    for i, index in zip(sparse, picked):
        out[i] = ("sparse", index)
    return out


@register
class Spt(Method):
    name = "spt"
    config_class = SptConfig
    default_targets = "all-linear"
    needs_data = True

    def adapter_for(self, base: nn.Linear, config: SptConfig, site: SiteContext) -> nn.Module:
        w = base.weight
        if site.saved is not None and "lora_A" in site.saved:
            kind, arg = "lora", site.saved["lora_A"].shape[0]
        elif site.saved is not None:
            kind, arg = "sparse", None
        else:
            if "plan" not in site.shared:
                weights = [b.weight for b in site.bases]
                sensitivity = scores(site.model, weights, config.batches, config.loss_fn,
                                     num_batches=config.num_batches, kind="sensitivity", per_example=False,
                                     method=self.name)
                site.shared["plan"] = plan(weights, sensitivity, config.budget(sum(x.numel() for x in weights)),
                                           config.lora_threshold)
            kind, arg = site.shared["plan"][site.index]
        if kind == "lora":
            return LoraAdapter(base.in_features, base.out_features, arg, 1.0, device=w.device, dtype=w.dtype)
        return SparseDelta.on(base, "weight", site, lambda: arg)

    def count_for(self, base: nn.Linear, config: SptConfig, site: SiteContext) -> int:
        return global_budget(config, site)
