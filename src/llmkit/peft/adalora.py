"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

    h = W0 x + (alpha / r) · P diag(Λ) Q x,   P ∈ R^{out×r}, Q ∈ R^{r×in} ~ N(0, 0.02²), Λ = 0

an SVD-shaped update whose singular values Λ are pruned during training to a shrinking total
budget (schedule, importance and regulariser: adalora_budget.py). The regulariser γ Σ R(P, Q) is
the method's penalty, part of the loss through `handle.wrap_loss` (as HF peft adds it to the
loss), and `BudgetCallback` (from `handle.callbacks()`) runs every step:
  - after backward: update the importance scores (from the gradients of the whole loss);
  - after the optimizer step: every `delta_t` steps keep the b(t) most important triplets, mask
    the others (λ = 0), and report the kept count as `rank_budget` in the step metrics (so
    metrics.jsonl, TensorBoard and TrainResult.metrics carry it).
Trainable parameters: r · (in + out + 1) per Linear (P, Q and Λ).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.dropout import Dropout
from .adalora_budget import budget_at, orthogonality, update_importance
from .errors import PeftError
from .registry import LowRankConfig, Method, register


@dataclass
class AdaLoraConfig(LowRankConfig):
    r: int = 12                        # initial rank per matrix (b0 = r · matrices)
    target_r: Optional[int] = None     # final average rank (b_T = target_r · matrices); None = 2r/3
    t_init: int = 0                    # warm-up steps before pruning starts
    t_final: int = 0                   # final steps at the target budget (mask fixed)
    delta_t: int = 1                   # steps between budget reallocations
    beta1: float = 0.85                # sensitivity smoothing
    beta2: float = 0.85                # uncertainty smoothing
    orth_reg: float = 0.5              # γ, weight of the orthogonality regulariser
    total_steps: Optional[int] = None  # T; None = the Trainer's max_steps

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_r is None:
            self.target_r = max(1, (2 * self.r) // 3)
        if not isinstance(self.target_r, int) or not 0 <= self.target_r <= self.r:
            raise PeftError(f"target_r={self.target_r!r}: expected an integer in [0, r={self.r}]")
        for name in ("t_init", "t_final"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise PeftError(f"{name}={getattr(self, name)!r}: expected a non-negative integer")
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise PeftError(f"delta_t={self.delta_t!r}: expected a positive integer")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise PeftError(f"{name}={getattr(self, name)!r}: expected a float in [0, 1)")
        if self.total_steps is not None and self.total_steps <= self.t_init + self.t_final:
            raise PeftError(f"total_steps={self.total_steps}: expected > t_init + t_final = "
                            f"{self.t_init + self.t_final}")


class AdaLoraAdapter(nn.Module):
    training_state = ("ibar_A", "ibar_E", "ibar_B", "ubar_A", "ubar_E", "ubar_B")

    def __init__(self, in_features: int, out_features: int, config: AdaLoraConfig, *, device=None, dtype=None):
        super().__init__()
        r = config.r
        self.r, self.scale = r, config.alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, in_features, device=device, dtype=dtype) * 0.02)   # Q
        self.lora_E = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))                       # Λ
        self.lora_B = nn.Parameter(torch.randn(out_features, r, device=device, dtype=dtype) * 0.02)  # P
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device))
        # Importance state: in the model's state dict, so Trainer checkpoints carry it and a resumed
        # run prunes exactly as an uninterrupted one; left out of adapter files (`training_state`).
        for p in ("A", "E", "B"):
            self.register_buffer(f"ibar_{p}", torch.zeros_like(getattr(self, f"lora_{p}")))
            self.register_buffer(f"ubar_{p}", torch.zeros_like(getattr(self, f"lora_{p}")))
        self.dropout = Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        z = F.linear(x, self.lora_A) * (self.lora_E * self.scale)                 # (..., r)
        return F.linear(z, self.lora_B)                                           # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B * (self.lora_E * self.scale)) @ self.lora_A           # (out, in)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.rank_mask
        return (self.lora_B * (self.lora_E * self.scale))[:, keep], self.lora_A[keep]

    def update_importance(self, beta1: float, beta2: float) -> None:
        for p in ("A", "E", "B"):
            update_importance(getattr(self, f"lora_{p}"), getattr(self, f"ibar_{p}"),
                              getattr(self, f"ubar_{p}"), beta1, beta2)

    def triplet_scores(self) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), shape (r,)."""
        s = {p: getattr(self, f"ibar_{p}") * getattr(self, f"ubar_{p}") for p in ("A", "E", "B")}
        return s["E"] + s["B"].mean(0) + s["A"].mean(1)

    def orthogonality(self) -> torch.Tensor:
        return orthogonality(self.lora_B, self.lora_A)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask, 0.0)


def _groups(handle):
    """(config, adapters) of each active AdaLoRA adapter name."""
    for name in handle.active:
        info = handle.adapters[name]
        adapters = [a for _, _, a in handle.adapter_modules(name)] if info.method == "adalora" else []
        if adapters:
            yield info.config, adapters


class BudgetCallback:
    """Runs AdaLoRA's per-step work for every active AdaLoRA adapter (see the module docstring)."""

    def __init__(self, handle):
        self.handle = handle
        self.history: list[tuple[int, int]] = []     # (step, kept triplets)

    def on_after_backward(self, trainer, step: int) -> None:
        for config, adapters in _groups(self.handle):
            for adapter in adapters:
                adapter.update_importance(config.beta1, config.beta2)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        kept_total = None
        for config, adapters in _groups(self.handle):
            total = config.total_steps or trainer.config.max_steps
            kept_total = reallocate(adapters, config, step, total)
        if kept_total is None:
            return
        metrics["rank_budget"] = float(kept_total)   # the Trainer logs it with the step's metrics
        self.history.append((step, kept_total))


@torch.no_grad()
def reallocate(adapters: list[AdaLoraAdapter], config: AdaLoraConfig, step: int, total: int) -> int:
    """Mask all but the b(step) most important triplets (on schedule); return the kept count."""
    b0, b_final = config.r * len(adapters), config.target_r * len(adapters)
    in_final = step >= total - config.t_final
    budget = budget_at(step, b0, b_final, config.t_init, config.t_final, total)
    kept_now = sum(int(a.rank_mask.sum()) for a in adapters)
    due = step >= config.t_init and (step % config.delta_t == 0 or (in_final and kept_now > b_final))
    if due and not (in_final and kept_now == b_final):
        scores = torch.cat([a.triplet_scores() for a in adapters])                 # (Σ r,)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        if budget > 0:
            keep[torch.topk(scores, min(budget, scores.numel())).indices] = True
        for a, chunk in zip(adapters, keep.split([a.r for a in adapters])):
            a.rank_mask.copy_(chunk)
    for a in adapters:
        a.apply_mask()
    return sum(int(a.rank_mask.sum()) for a in adapters)


def orthogonality_penalty(handle, adapter_name: Optional[str] = None) -> torch.Tensor:
    """Σ R(P, Q) over the AdaLoRA adapters (for manual loops and tests)."""
    adapters = [a for _, _, a in handle.adapter_modules(adapter_name) if isinstance(a, AdaLoraAdapter)]
    if not adapters:
        raise PeftError("orthogonality_penalty: the model has no AdaLoRA adapter")
    return sum(a.orthogonality() for a in adapters)


@register
class AdaLoRA(Method):
    name = "adalora"
    config_class = AdaLoraConfig

    def make_adapter(self, base: nn.Module, config: AdaLoraConfig) -> nn.Module:
        return AdaLoraAdapter(base.in_features, base.out_features, config,
                              device=base.weight.device, dtype=base.weight.dtype)

    def trainable_count(self, base: nn.Module, config: AdaLoraConfig) -> int:
        return config.r * (base.in_features + base.out_features + 1)

    def callbacks(self, handle) -> list:
        return [BudgetCallback(handle)]

    def penalty(self, handle) -> Optional[torch.Tensor]:
        """γ Σ R(P, Q) over the active AdaLoRA adapters, each adapter name with its own γ = orth_reg."""
        terms = [config.orth_reg * sum(a.orthogonality() for a in adapters)
                 for config, adapters in _groups(handle) if config.orth_reg > 0]
        return sum(terms[1:], terms[0]) if terms else None
