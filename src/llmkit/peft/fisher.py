"""Scores of weight entries from training data, for the methods that select by data:

    empirical Fisher   F_j = Σ_i (∂ℓ_i / ∂θ_j)²            (FishMask, Fish-DiP; per example i)
    batch Fisher       F_j = Σ_b (∂L_b / ∂θ_j)²            (Child-tuning_F: per batch b, as its paper)
    sensitivity        S_j = Σ_b |∂L_b / ∂θ_j · θ_j|       (SPT: first-order Taylor of the loss)

over `num_batches` batches of the config's `batches`, with its `loss_fn(model, batch)`. The model
runs in eval mode (no dropout: the score is a function of the weights and data alone) and the
gradient is taken with respect to the tensors given - with an adapter active, the gradient of the
base weight equals the gradient of the effective weight θ₀ + Δ, so a score "from the current
model" (Fish-DiP) needs nothing else. No parameter's requires_grad or .grad is left changed.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import islice
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .errors import PeftError


def batch_loss(loss_fn: Callable, model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss of `loss_fn(model, batch)`, which may return a tensor or (loss, metrics)."""
    out = loss_fn(model, batch)
    return out[0] if isinstance(out, (tuple, list)) else out


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise PeftError(f"a batch of type {type(batch).__name__} holds no tensor with a batch dimension")


def example(batch: Any, i: int, n: int) -> Any:
    """Example i of a batch of n, still with a batch dimension of 1 (tensors whose first dimension
    is n are sliced; everything else is passed through)."""
    def cut(v):
        return v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


@contextmanager
def gradients_of(model: nn.Module, tensors: list[torch.Tensor]):
    """Eval mode, and requires_grad on `tensors` only for the duration."""
    flags = [t.requires_grad for t in tensors]
    was_training = model.training
    model.eval()
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
        model.train(was_training)


def draw(batches: Optional[Iterable], num_batches: int, method: str) -> list:
    """`num_batches` batches from `batches` (an iterator is advanced; an iterable restarts)."""
    if batches is None:
        raise PeftError(f"{method}: selects from data: pass batches= (an iterable of training batches) and "
                        "loss_fn=(model, batch) -> loss; the recipe jobs pass their training data")
    drawn = list(islice(iter(batches), num_batches))
    if not drawn:
        raise PeftError(f"{method}: batches= yielded 0 batches; a Fisher or sensitivity over zero batches "
                        f"is undefined (expected num_batches={num_batches} batches)")
    return drawn


def scores(model: nn.Module, weights: list[torch.Tensor], batches: Iterable, loss_fn: Optional[Callable], *,
           num_batches: int, kind: str = "fisher", per_example: bool = True, top_examples: Optional[int] = None,
           method: str = "fisher") -> list[torch.Tensor]:
    """One score tensor per weight (its shape, float32): kind "fisher" (Σ g², per example or per
    batch) or "sensitivity" (Σ_b |g ⊙ θ|). `top_examples`: only the n examples with the highest
    current loss count (Fish-DiP's sample-aware Fisher)."""
    drawn = draw(batches, num_batches, method)
    if loss_fn is None:
        raise PeftError(f"{method}: selects from data: pass loss_fn=(model, batch) -> loss with batches=")
    total = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    with gradients_of(model, weights):
        units = drawn
        if per_example or top_examples is not None:
            units = [example(b, i, batch_size(b)) for b in drawn for i in range(batch_size(b))]
        if top_examples is not None and top_examples < len(units):
            with torch.no_grad():
                losses = torch.stack([batch_loss(loss_fn, model, u).detach().float() for u in units])
            units = [units[i] for i in torch.topk(losses, top_examples).indices.tolist()]
        for unit in units:
            grads = torch.autograd.grad(batch_loss(loss_fn, model, unit), weights, allow_unused=True)
            for acc, g, w in zip(total, grads, weights):
                if g is None:
                    continue
                g = g.float()
                acc.add_(g.square() if kind == "fisher" else (g * w.detach().float()).abs())
    return total
