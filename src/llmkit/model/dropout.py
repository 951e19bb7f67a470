"""Dropout (Srivastava et al., 2014) with a cheaper random mask on CPU.

    y = x ⊙ m / (1 - p),   m_i ~ Bernoulli(1 - p) independently,   so E[y] = x.

Why not torch's own: on CPU, `F.dropout` draws one Mersenne-Twister number per element through
`bernoulli_` (measured ~7 ms for a 32x12x64x64 attention tensor on 2 cores, 13% of a MiniLM LoRA
training step). Here one 64-bit draw feeds four 16-bit lanes and a comparison turns them into the
keep mask (~1.5 ms for the same tensor). The drop probability becomes p' = round(p·2^16) / 2^16,
within 7.7e-6 of p, and the kept values are scaled by exactly 1 / (1 - p'), so E[y] = x still holds.
On other devices (CUDA's fused Philox dropout is already cheap) and for p' in {0, 1} the module
defers to `F.dropout`. The mask comes from torch's global generator, so `torch.manual_seed` makes
runs repeatable and checkpoints that store the RNG state resume exactly.

`dropout_add(residual, y)` fuses the residual add into the same pass (one addcmul), and
`keep_mask` is shared with the attention path, which folds 1 / (1 - p') into its output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 1 << 16           # 16-bit lanes: p is quantized to multiples of 2^-16


def _quantized_threshold(p: float) -> int:
    return int(round(p * _LANES))


def fast_path(x: torch.Tensor, p: float) -> bool:
    """True where the 16-bit mask applies: CPU tensors with 0 < p' < 1."""
    return x.device.type == "cpu" and 0 < _quantized_threshold(p) < _LANES


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool keep-mask of `shape` with P(keep) = 1 - p' and the matching scale 1 / (1 - p')."""
    threshold = _quantized_threshold(p)
    n = math.prod(shape)
    # The full signed range: a bare random_() on int64 never sets the top bit, which would make
    # every fourth lane non-uniform.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), (1 << 63) - 1)
    lanes = words.view(torch.int16)[:n].view(shape)                # uniform on [-2^15, 2^15)
    keep = lanes >= threshold - (_LANES // 2)                       # P(drop) = threshold / 2^16
    return keep, _LANES / (_LANES - threshold)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if not fast_path(x, p):
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return x * keep * scale          # autograd saves only the 1-byte mask


def dropout_add(residual: torch.Tensor, y: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """residual + dropout(y) in one pass on the fast path."""
    if not training or p == 0.0:
        return residual + y
    if not fast_path(y, p):
        return residual + F.dropout(y, p, training=True)
    keep, scale = keep_mask(y.shape, p, y.device)
    return torch.addcmul(residual, y, keep, value=scale)


class Dropout(nn.Module):
    """Drop-in for nn.Dropout (same `p`, no parameters) using the mask above; `add(residual, y)`
    is residual + dropout(y) fused."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p!r}: expected a probability in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def add(self, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dropout_add(residual, y, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
