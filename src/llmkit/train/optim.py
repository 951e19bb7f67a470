"""Optimizers and learning-rate schedules.

Optimizers (torch.optim implementations, built from `TrainConfig`; with `fused_optimizer: true`
Adam and AdamW run torch's fused kernel, see `fused_kernel_fits`):

- Adam (Kingma & Ba, 2015): with g_t the gradient,
      m_t = β1 m_{t-1} + (1 − β1) g_t,   v_t = β2 v_{t-1} + (1 − β2) g_t²,
      θ_t = θ_{t-1} − η_t · m̂_t / (√v̂_t + ε),  m̂_t = m_t / (1 − β1^t), v̂_t = v_t / (1 − β2^t);
  its weight decay is an L2 term added to the gradient: g_t ← g_t + λ θ_{t-1}.
- AdamW (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization"): the same update, with
  the decay decoupled from the adaptive step: θ_t = θ_{t-1} − η_t (m̂_t / (√v̂_t + ε) + λ θ_{t-1}).
- SGD with momentum (Polyak, 1964; Sutskever et al., 2013): b_t = μ b_{t-1} + g_t, θ_t = θ_{t-1} − η_t b_t.

Weight decay is applied only to parameters with dim >= 2 (matrices and embeddings); biases and
norm gains (dim < 2) are never decayed, as in GPT-2/nanoGPT. Only parameters with
`requires_grad=True` are optimized, so a PEFT method that freezes the base model trains its
adapters alone.

Schedule (`lr_at`): update n (1-based; n = 1 … max_steps) uses
      η(n) = lr · n / W                                        for n <= W (linear warmup, Goyal et al., 2017)
      η(n) = min_lr + ½ (lr − min_lr)(1 + cos(π p))            cosine (SGDR, Loshchilov & Hutter, 2017)
      η(n) = min_lr + (lr − min_lr)(1 − p)                     linear
      η(n) = lr                                                constant
  with p = (n − W) / (max_steps − W) ∈ [0, 1], so η(0) = 0, η(W) = lr and η(max_steps) = min_lr.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into {"group": "decay"} (dim >= 2) and {"group": "no_decay"}
    (dim < 2: biases, norm weights). Tied parameters appear once (named_parameters dedups them)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no parameter with requires_grad=True: there is nothing to train")
    groups = ({"params": decay, "weight_decay": weight_decay, "group": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"})
    return [group for group in groups if group["params"]]


def fused_kernel_fits(groups: list[dict]) -> bool:
    """Whether torch's fused Adam/AdamW kernel takes these parameters: floating point, on one CPU or
    CUDA device. Why fused: off CUDA torch picks its per-tensor for-loop implementation, several small
    kernels per parameter; the fused kernel makes one pass. On the Shakespeare-char recipe (2 CPU
    cores) that took the step from 41.5 to 37.9 ms. It is opt-in: the update is the same formula, but
    its rounding differs from the for-loop's, and runs tuned on the default would not repeat bit for bit."""
    params = [p for group in groups for p in group["params"]]
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in params))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        if config.fused_optimizer and not fused_kernel_fits(groups):
            found = sorted({f"{p.device.type}/{p.dtype}" for g in groups for p in g["params"]})
            raise ValueError(f"TrainConfig.fused_optimizer=True: expected floating-point parameters on one CPU "
                             f"or CUDA device, found {found}")
        fused = True if config.fused_optimizer else None  # None: torch's default implementation
        return cls(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    raise ValueError(f"TrainConfig.optimizer={config.optimizer!r}: expected one of adamw, adam, sgd")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of update number `step` (1-based; see the module docstring for the formula)."""
    warmup, total = config.warmup_steps, config.max_steps
    if warmup > 0 and step <= warmup:
        return config.lr * step / warmup
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if config.schedule == "cosine":
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return config.min_lr + (config.lr - config.min_lr) * (1.0 - progress)
    raise ValueError(f"TrainConfig.schedule={config.schedule!r}: expected one of cosine, linear, constant")


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    """A LambdaLR whose multiplier after k scheduler steps is lr_at(k + 1) / lr: the k-th completed
    update leaves the rate of update k + 1 in place. Each group's own base rate is scaled, so a
    method that gives some groups a different lr (LoRA+, layer-wise rates) keeps its ratios."""
    return LambdaLR(optimizer, lambda completed: lr_at(completed + 1, config) / config.lr)
