"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    h = W0 x + (alpha / r) · B A dropout(x),   A ∈ R^{r×in} kaiming-uniform,  B ∈ R^{out×r} = 0

so the adapted model equals the base at init. rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA") uses alpha / sqrt(r) instead, which keeps the update's
scale independent of r. On an nn.Embedding (as in HF peft): ΔE = (alpha/r) · (B A)^T with
A ∈ R^{r×V} = 0 and B ∈ R^{d×r} ~ N(0, 1), looked up like the base table.
Trainable parameters: r · (in + out) per Linear, r · (V + d) per Embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.dropout import Dropout
from .registry import LowRankConfig, Method, register


@dataclass
class LoraConfig(LowRankConfig):
    rslora: bool = False               # scale alpha / sqrt(r) instead of alpha / r
    scale: Optional[float] = None      # a fixed scale instead (weighted combinations carry 1.0)


def lora_scale(config: "LoraConfig") -> float:
    if config.scale is not None:
        return config.scale
    return config.alpha / math.sqrt(config.r) if config.rslora else config.alpha / config.r


class LoraAdapter(nn.Module):
    """One LoRA adapter of a Linear: forward(x) = scale · B A dropout(x)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float = 0.0,
                 *, device=None, dtype=None):
        super().__init__()
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))    # nn.Linear's own init, as the paper
        self.dropout = Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        # (x A^T) B^T, never B A: the rank-r intermediate keeps it O(N r (in + out)).
        z = F.linear(x, self.lora_A) * self.scale                                 # (..., r)
        return F.linear(z, self.lora_B)                                           # (..., out)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + forward(x) as one addmm: the scale and the add ride on the second matmul, so no
        (..., out) temporary, no separate scale pass and no in-place write into the base output."""
        if self.dropout is not None:
            x = self.dropout(x)
        z = F.linear(x, self.lora_A)                                              # (..., r)
        n_out = out.shape[-1]
        summed = torch.addmm(out.reshape(-1, n_out), z.reshape(-1, self.r), self.lora_B.t(),
                             alpha=self.scale)                                    # (N, out)
        return summed.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale                           # (out, in)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with B' A' = ΔW, the scale folded into B'."""
        return self.lora_B * self.scale, self.lora_A


class LoraEmbeddingAdapter(nn.Module):
    """One LoRA adapter of an Embedding: forward(ids) = scale · A^T[ids] B^T."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, scale: float,
                 *, device=None, dtype=None):
        super().__init__()
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.zeros(r, num_embeddings, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.randn(embedding_dim, r, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = F.embedding(ids, self.lora_A.t()) * self.scale                        # (B, T, r)
        return F.linear(z, self.lora_B)                                           # (B, T, d)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).t() * self.scale                       # (V, d)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B * self.scale, self.lora_A


def linear_shape(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    return base.in_features, base.out_features


@register
class LoRA(Method):
    name = "lora"
    config_class = LoraConfig
    layer_types = (nn.Linear, nn.Embedding)

    def make_adapter(self, base: nn.Module, config: LoraConfig) -> nn.Module:
        scale = lora_scale(config)
        w = base.weight
        if isinstance(base, nn.Embedding):
            return LoraEmbeddingAdapter(base.num_embeddings, base.embedding_dim, config.r, scale,
                                        device=w.device, dtype=w.dtype)
        return LoraAdapter(base.in_features, base.out_features, config.r, scale, config.dropout,
                           device=w.device, dtype=w.dtype)

    def trainable_count(self, base: nn.Module, config: LoraConfig) -> int:
        n_in, n_out = linear_shape(base)
        return config.r * (n_in + n_out)
