"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", T-Few): learned vectors rescale inner activations.

    k = l_k ⊙ (W_k x + b_k),   v = l_v ⊙ (W_v x + b_v),   FFN(x) = W_down (l_ff ⊙ a(x)) + b_down

l_k, l_v ∈ R^{d_kv}, l_ff ∈ R^{d_ff}, all ones at init (the base model exactly). Keys and values
scale the layer's output, the FFN scales the input of its down projection (the intermediate
activation), as HF peft's IA3 does with `feedforward_modules`. Merging folds the vector into the
weight: W <- diag(l) W, b <- l ⊙ b (output), or W <- W diag(l) (input); unmerging divides it
back out. Trainable parameters: out_features per key/value layer, in_features per FFN layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import AdapterConfig, Method, SiteContext, register


@dataclass
class IA3Config(AdapterConfig):
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])   # scaled on their input


class IA3Vector(nn.Module):
    """l ⊙ t over the last axis: t is a layer's input (`scales="input"`) or its output ("output")."""

    def __init__(self, n: int, scales: str, *, device=None, dtype=None):
        super().__init__()
        self.scales = scales
        self.ia3_l = nn.Parameter(torch.ones(n, device=device, dtype=dtype))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.ia3_l

    @torch.no_grad()
    def merge_into(self, layer: nn.Linear) -> None:
        l = self.ia3_l.to(layer.weight.dtype)
        if self.scales == "input":
            layer.weight.mul_(l)                                   # W diag(l): columns
        else:
            layer.weight.mul_(l[:, None])                          # diag(l) W: rows
            if layer.bias is not None:
                layer.bias.mul_(l)

    @torch.no_grad()
    def unmerge_from(self, layer: nn.Linear) -> None:
        l = self.ia3_l.to(layer.weight.dtype)
        if self.scales == "input":
            layer.weight.div_(l)
        else:
            layer.weight.div_(l[:, None])
            if layer.bias is not None:
                layer.bias.div_(l)


def is_feedforward(name: str, config: IA3Config) -> bool:
    return any(name == m or name.endswith("." + m) for m in config.feedforward_modules)


@register
class IA3(Method):
    name = "ia3"
    config_class = IA3Config
    default_targets = ("k_proj", "v_proj", "down_proj")

    def adapter_for(self, base: nn.Linear, config: IA3Config, site: SiteContext) -> nn.Module:
        w = base.weight
        if is_feedforward(site.path, config):
            return IA3Vector(base.in_features, "input", device=w.device, dtype=w.dtype)
        return IA3Vector(base.out_features, "output", device=w.device, dtype=w.dtype)

    def count_for(self, base: nn.Linear, config: IA3Config, site: SiteContext) -> int:
        return base.in_features if is_feedforward(site.path, config) else base.out_features
