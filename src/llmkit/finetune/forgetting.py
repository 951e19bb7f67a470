"""Catastrophic forgetting: measure it (held-out pretraining perplexity before/after) and reduce it.

Fine-tuning on a narrow task moves the weights away from what pretraining learned, and the model's
pretraining objective gets worse (McCloskey & Cohen 1989; Kirkpatrick et al. 2017 call it
catastrophic forgetting). This module gives the measurement and two remedies:

- `heldout_perplexity(model, batches)`: the token-weighted next-token cross-entropy on held-out
  pretraining text, L = Σ_b Σ_t ℓ_bt / N over the N scored (non -100) targets, and ppl = exp(L).
  Run it before and after fine-tuning; `forgetting_report(before, after)` gives the difference.
- `L2ToInitial` (L2-SP; Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer
  Learning with Convolutional Networks", ICML): add Ω(θ) = (α/2) ‖θ − θ₀‖² to the task loss, pulling
  the trainable parameters towards their pretrained values θ₀ instead of towards 0 as weight decay
  does; its gradient is α (θ − θ₀).
- `PairedBatches` + `mixed_loss` (pretraining mix; the "PPO-ptx" objective of InstructGPT, Ouyang et
  al. 2022, "Training language models to follow instructions with human feedback", adds
  γ · E[log π(x)] over pretraining data to the RL objective): each step sees one task batch and one
  pretraining batch and minimises L = L_task + w · L_pretrain.

Both remedies act during training only: in eval mode (the Trainer's validation) the L2 wrapper
returns the bare task loss, and `mixed_loss` given a plain (unpaired) task batch scores the task
alone, so validation numbers stay comparable with and without them.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..data.batches import MixedBatches
from ..train.distributed import unwrap
from ..objectives.clm import clm_loss
from .loops import heldout_perplexity  # noqa: F401  (the measurement, re-exported)

__all__ = ["L2ToInitial", "PairedBatches", "mixed_loss", "heldout_perplexity", "forgetting_report",
           "format_forgetting"]

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]


# ---- L2 towards the initial weights ------------------------------------------------------------
class L2ToInitial:
    """Ω(θ) = (coef / 2) · Σ_i ‖θ_i − θ₀_i‖² over the parameters trainable at construction (L2-SP).

    θ₀ is a detached copy of those parameters taken now: construct it after loading the pretrained
    weights (and after applying PEFT, so θ₀ covers the adapter parameters that train). The copy costs
    one model's worth of memory for the trainable parameters; it follows each parameter to its device
    on first use. FSDP-sharded (DTensor) parameters are not supported."""

    def __init__(self, model: nn.Module, coef: float):
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0 or not math.isfinite(coef):
            raise ValueError(f"L2ToInitial coef={coef!r}: expected a finite number >= 0")
        self.coef = float(coef)
        self.initial = {name: p.detach().clone() for name, p in unwrap(model).named_parameters() if p.requires_grad}
        if not self.initial:
            raise ValueError("L2ToInitial: the model has no trainable parameters to anchor")

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """(coef / 2) Σ ‖θ − θ₀‖² as a scalar fp32 tensor with gradient coef · (θ − θ₀)."""
        params = dict(unwrap(model).named_parameters())
        missing = [name for name in self.initial if name not in params]
        if missing:
            raise KeyError(f"L2ToInitial: parameters {missing[:3]} of the snapshot are not in the model; "
                           "expected the model the snapshot was taken from")
        total = None
        for name, start in self.initial.items():
            p = params[name]
            if start.device != p.device:
                start = self.initial[name] = start.to(p.device)
            term = (p.float() - start.float()).pow(2).sum()
            total = term if total is None else total + term
        return 0.5 * self.coef * total

    def wrap(self, loss_fn: LossFn) -> LossFn:
        """loss_fn whose loss is task loss + penalty in train mode (task loss alone in eval mode);
        its metrics are the task's plus "l2_init" (the penalty value)."""
        def loss_with_l2(model, batch):
            loss, metrics = loss_fn(model, batch)
            metrics = dict(metrics or {})
            if model.training:
                penalty = self.penalty(model)
                loss = loss + penalty.to(loss.dtype)
            else:
                with torch.no_grad():
                    penalty = self.penalty(model)
            metrics["l2_init"] = float(penalty.detach())
            return loss, metrics
        return loss_with_l2


# ---- mixing pretraining data -------------------------------------------------------------------
class PairedBatches(MixedBatches):
    """Yields {"task": task batch, "pretrain": pretraining batch}, one of each per step (lists cycle)."""

    def __init__(self, task_batches: Iterable, pretrain_batches: Iterable):
        super().__init__({"task": task_batches, "pretrain": pretrain_batches})


def is_paired(batch: Any) -> bool:
    return isinstance(batch, dict) and set(batch) == {"task", "pretrain"}


def mixed_loss(task_loss_fn: LossFn, pretrain_loss_fn: LossFn = clm_loss, weight: float = 1.0) -> LossFn:
    """loss_fn over PairedBatches: L = L_task + weight · L_pretrain.

    Metrics: the task loss_fn's metrics passed through under their own names (so "accuracy" stays
    "accuracy"), plus "task_loss", "pretrain_loss", and the pretraining loss_fn's other metrics
    prefixed "pretrain/" (e.g. "pretrain/ppl"). A plain task batch (not a {"task", "pretrain"} pair,
    e.g. a validation batch) is scored by task_loss_fn alone."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or not math.isfinite(weight):
        raise ValueError(f"mixed_loss weight={weight!r}: expected a finite number >= 0")

    def loss_fn(model, batch):
        if not is_paired(batch):
            return task_loss_fn(model, batch)
        task_loss, task_metrics = task_loss_fn(model, batch["task"])
        pretrain_loss, pretrain_metrics = pretrain_loss_fn(model, batch["pretrain"])
        metrics = dict(task_metrics or {})
        metrics.update({f"pretrain/{k}": v for k, v in (pretrain_metrics or {}).items() if k != "loss"})
        metrics["task_loss"] = float(task_loss.detach())
        metrics["pretrain_loss"] = float(pretrain_loss.detach())
        return task_loss + weight * pretrain_loss, metrics
    return loss_fn


# ---- the report --------------------------------------------------------------------------------
def forgetting_report(before: dict, after: dict) -> dict:
    """{"before", "after", "delta", "relative"} for loss and ppl; delta = after − before, relative =
    delta / before. A positive delta means the pretraining objective got worse: forgetting."""
    for name, side in (("before", before), ("after", after)):
        missing = [k for k in ("loss", "ppl") if not isinstance(side, dict) or k not in side]
        if missing:
            raise ValueError(f"forgetting_report: {name} lacks {missing}; expected heldout_perplexity() output "
                             f"{{'loss', 'ppl', 'tokens'}}, got {side!r}")
    report = {"before": dict(before), "after": dict(after), "delta": {}, "relative": {}}
    for key in ("loss", "ppl"):
        b, a = float(before[key]), float(after[key])
        report["delta"][key] = a - b
        report["relative"][key] = (a - b) / b if b else math.nan
    return report


def format_forgetting(report: dict) -> str:
    """The report as a markdown table (held-out pretraining text, before vs after fine-tuning)."""
    def num(v: float) -> str:
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    lines = ["| held-out pretraining text | before | after | change | relative |",
             "|---|---:|---:|---:|---:|"]
    for key, label in (("loss", "loss (nats/token)"), ("ppl", "perplexity")):
        b, a = report["before"][key], report["after"][key]
        d, r = report["delta"][key], report["relative"][key]
        lines.append(f"| {label} | {num(b)} | {num(a)} | {d:+.4f} | {r:+.1%} |")
    tokens = report["before"].get("tokens")
    if tokens is not None:
        lines.append("")
        lines.append(f"Scored tokens: {int(tokens):,}.")
    return "\n".join(lines) + "\n"
