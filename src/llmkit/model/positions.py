"""Positional encodings: learned and sinusoidal tables, rotary embeddings (RoPE), ALiBi biases.

- Sinusoidal (Vaswani et al., 2017): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...).
- RoPE (Su et al., 2021), rotate-half form: x' = x * cos(p*w) + rotate_half(x) * sin(p*w) with
  w_i = theta^(-2i/d). Scalings: "linear" (positions / factor) and "llama3" (Meta, 2024: divide low
  frequencies by `factor`, keep high ones, interpolate smoothly in between).
- ALiBi (Press et al., 2022): score(q, k) += -slope_h * |q - k|; slopes in `config.alibi_slopes`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, alibi_slopes


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """(n_positions, dim) table, sin on even columns and cos on odd ones."""
    position = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)          # (P, 1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(position * inv)                                      # (P, d/2)
    table[:, 1::2] = torch.cos(position * inv)[:, : dim // 2]
    return table


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """w_i = theta^(-2i/d) for i < d/2, with the config's scaling applied. Shape (d/2,)."""
    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are stretched by `factor`; short ones are kept.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) for given positions; the tables are recomputed per call in fp32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids: (B, T) -> cos, sin: (B, 1, T, hd) ready to broadcast over heads
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()          # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                      # (B, T, hd)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


def alibi_bias(n_heads: int, q_positions: torch.Tensor, k_positions: torch.Tensor,
               causal: bool) -> torch.Tensor:
    """(1, nh, Tq, Tk) additive bias -slope_h * distance(q, k)."""
    slopes = torch.tensor(alibi_slopes(n_heads), dtype=torch.float32, device=q_positions.device)
    distance = (q_positions.view(-1, 1) - k_positions.view(1, -1)).float()          # (Tq, Tk)
    distance = distance.clamp(min=0) if causal else distance.abs()
    return (-slopes.view(1, -1, 1, 1)) * distance.unsqueeze(0).unsqueeze(0)
