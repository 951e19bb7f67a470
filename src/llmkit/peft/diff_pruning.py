"""Diff pruning (Guo et al. 2021, "Parameter-Efficient Transfer Learning with Diff Pruning"):

    θ = θ₀ + z ⊙ w,    z = min(1, max(0, s̄)),   s̄ = s (r − l) + l,
    s = σ((log u − log(1 − u) + log α) / β),   u ~ U(0, 1)

a task delta w gated by the hard-concrete relaxation z of a binary mask (Louizos et al. 2018),
with stretch limits l < 0 < 1 < r and temperature β. Training adds the expected-L0 penalty

    λ · E[‖z‖₀] = λ · Σ_groups size_g · σ(log α_g − β log(−l / r))

(the probability that each gate is nonzero, in closed form). In eval mode the gate is the
deterministic min(1, max(0, σ(log α)(r − l) + l)). `structure` "row" or "block" is the structured
variant: a group (a weight row, or `block_size` consecutive entries) shares one gate.

After training the delta is magnitude-pruned to `density` (or `count`) of the targeted entries:
the k largest |z ⊙ w| over all targets together become a plain sparse delta (selective.py), at
step `prune_at` (the rest of the run tunes the kept entries with the mask fixed, the paper's second
phase) or, with prune_at=None, at the end of training; `prune(handle)` does it by hand.
Trainable before pruning: every targeted entry (w) + one log α per group; after: exactly k.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import PeftError
from .registry import Method, SelectionConfig, SiteContext, register
from .selective import SparseDelta, global_budget, global_top
from .sparse_optim import drop_parameter, replace_parameter

STRUCTURES = ("entry", "row", "block")


@dataclass
class DiffPruningConfig(SelectionConfig):
    l0_lambda: float = 1.25e-7        # λ per entry of the expected L0
    log_alpha_init: float = 5.0       # gates start open (P(z > 0) ≈ 0.99)
    beta: float = 1.0                 # temperature of the hard-concrete
    stretch: tuple = (-1.5, 1.5)      # (l, r)
    structure: str = "entry"          # "entry" | "row" | "block": which entries share a gate
    block_size: int = 64
    prune_at: Optional[int] = None    # the step that prunes to density; None: the end of training
    pruned: bool = False              # set by pruning: the adapters are plain sparse deltas now

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.structure not in STRUCTURES:
            raise PeftError(f"structure={self.structure!r}: expected one of {list(STRUCTURES)}")
        low, high = self.stretch = tuple(self.stretch)
        if not (low < 0 and high > 1):
            raise PeftError(f"stretch={self.stretch!r}: expected (l, r) with l < 0 and r > 1")
        if not self.beta > 0 or self.l0_lambda < 0:
            raise PeftError(f"beta={self.beta!r}, l0_lambda={self.l0_lambda!r}: expected beta > 0, l0_lambda >= 0")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise PeftError(f"block_size={self.block_size!r}: expected a positive integer")
        if self.prune_at is not None and (not isinstance(self.prune_at, int) or self.prune_at <= 0):
            raise PeftError(f"prune_at={self.prune_at!r}: expected a positive step or None (the end of training)")


def gate_groups(shape: tuple[int, ...], config: DiffPruningConfig) -> tuple[int, int]:
    """(entries a gate covers, number of gates) for a weight of `shape`."""
    numel = math.prod(shape)
    size = {"entry": 1, "row": numel // shape[0], "block": config.block_size}[config.structure]
    return size, -(-numel // size)


class HardConcreteDelta(nn.Module):
    """z ⊙ w on the layer's weight; `log_alpha` (groups,), `w` (numel,)."""
    patches = "weight"

    def __init__(self, shape: tuple[int, ...], config: DiffPruningConfig, *, device=None, dtype=None):
        super().__init__()
        self.shape, self.numel = tuple(shape), math.prod(shape)
        self.structure, (self.low, self.high), self.beta = config.structure, config.stretch, config.beta
        self.group, groups = gate_groups(self.shape, config)
        self.w = nn.Parameter(torch.zeros(self.numel, device=device, dtype=dtype))
        self.log_alpha = nn.Parameter(torch.full((groups,), float(config.log_alpha_init), device=device,
                                                 dtype=torch.float32))

    def deltas(self):
        return [("weight", self)]

    def gate(self) -> torch.Tensor:
        """z per group: a hard-concrete sample in training, its deterministic value in eval."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)              # (groups,)

    def expected_l0(self) -> torch.Tensor:
        """E[‖z‖₀] over the entries: Σ_g size_g · P(z_g ≠ 0), P = σ(log α − β log(−l/r))."""
        p = torch.sigmoid(self.log_alpha - self.beta * math.log(-self.low / self.high))
        sizes = torch.full_like(p, float(self.group))
        sizes[-1] = self.numel - self.group * (p.numel() - 1)                        # a short last block
        return (p * sizes).sum()

    def delta(self) -> torch.Tensor:
        z = self.gate()
        if self.group > 1:
            z = z.repeat_interleave(self.group)[: self.numel]
        return z.to(self.w.dtype) * self.w                                             # (numel,)

    def patched(self, param: torch.Tensor) -> torch.Tensor:
        return (param.reshape(-1) + self.delta().to(param.dtype)).view(self.shape)

    @torch.no_grad()
    def merge_into(self, layer: nn.Module) -> None:
        self._before = layer.weight.detach().clone()
        layer.weight.copy_(self.patched(layer.weight))

    @torch.no_grad()
    def unmerge_from(self, layer: nn.Module) -> None:
        layer.weight.copy_(self._before)
        del self._before


@torch.no_grad()
def prune(handle, name: Optional[str] = None, optimizer=None) -> int:
    """Magnitude-prune diff-pruning adapter `name` (default: every active one) to its density:
    the k largest |z ⊙ w| (eval gates) over all its sites stay, as sparse deltas. Returns k."""
    kept = 0
    for adapter_name in [name] if name else list(handle.active):
        info = handle.adapters[adapter_name]
        if info.method != "diff_pruning" or info.config.pruned:
            continue
        sites = [(site, a) for _, site, a in handle.adapter_modules(adapter_name)]
        was = [a.training for _, a in sites]
        for _, a in sites:
            a.eval()
        deltas = [a.delta().detach() for _, a in sites]
        for (_, a), flag in zip(sites, was):
            a.train(flag)
        k = info.config.budget(sum(d.numel() for d in deltas))
        chosen = global_top([d.abs() for d in deltas], k)
        for (site, adapter), delta, index in zip(sites, deltas, chosen):
            sparse = SparseDelta("weight", adapter.shape, index, device=delta.device, dtype=adapter.w.dtype)
            sparse.values.copy_(delta[index])
            sparse.train(adapter.training)
            site.named[adapter_name] = sparse
            replace_parameter(optimizer, adapter.w, sparse.values)     # same group: same lr / decay
            drop_parameter(optimizer, adapter.log_alpha)
        info.config = dataclasses.replace(info.config, pruned=True)
        kept += k
    handle.set_active(handle.active)                                   # requires_grad on the kept values
    return kept


class PruneCallback:
    """Prunes at step prune_at, or at the end of training if not pruned by then; the best-so-far
    snapshot is reset, since the model's trainable form changed."""

    def __init__(self, handle):
        self.handle = handle

    def _prune(self, trainer, due) -> None:
        names = [n for n in self.handle.active if self.handle.adapters[n].method == "diff_pruning"
                 and not self.handle.adapters[n].config.pruned and due(self.handle.adapters[n].config)]
        for n in names:
            prune(self.handle, n, getattr(trainer, "optimizer", None))
        if names and hasattr(trainer, "best"):
            trainer.best.reset()

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self._prune(trainer, lambda c: c.prune_at == step)

    def on_train_end(self, trainer) -> None:
        self._prune(trainer, lambda c: True)      # prune_at=None, or a run that ended before prune_at


@register
class DiffPruning(Method):
    name = "diff_pruning"
    config_class = DiffPruningConfig
    default_targets = "all-linear"

    def adapter_for(self, base: nn.Linear, config: DiffPruningConfig, site: SiteContext) -> nn.Module:
        if config.pruned:
            if site.saved is None:
                raise PeftError("diff_pruning: pruned=True describes a saved, pruned delta; a new adapter "
                                "starts unpruned (leave pruned out)")
            return SparseDelta.on(base, "weight", site, lambda: None)
        w = base.weight
        return HardConcreteDelta(tuple(w.shape), config, device=w.device, dtype=w.dtype)

    def count_for(self, base: nn.Linear, config: DiffPruningConfig, site: SiteContext) -> int:
        if config.pruned:
            return global_budget(config, site)
        return base.weight.numel() + gate_groups(tuple(base.weight.shape), config)[1]      # w + log α

    def penalty(self, handle) -> Optional[torch.Tensor]:
        """λ Σ E[‖z‖₀] over the active, unpruned adapters."""
        terms = [handle.adapters[n].config.l0_lambda * a.expected_l0()
                 for n in handle.active if handle.adapters[n].method == "diff_pruning"
                 for _, _, a in handle.adapter_modules(n) if isinstance(a, HardConcreteDelta)]
        return sum(terms[1:], terms[0]) if terms else None

    def callbacks(self, handle) -> list:
        return [PruneCallback(handle)]
