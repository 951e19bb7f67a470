"""Normalisation layers: LayerNorm (GPT-2, BERT, BART) and RMSNorm (Llama, Mistral)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * g.

    The statistic is taken in fp32 and the result cast back, so bf16 activations keep their range.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def build_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.norm_bias)
