"""Heads that turn hidden states (B, T, d) into task outputs, and the pooling they share."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .dropout import Dropout
from .mlp import ACTIVATION_FUNCTIONS
from .norms import build_norm

POOLINGS = ("cls", "mean", "last")


def last_token_index(attention_mask: Optional[torch.Tensor], batch: int, length: int,
                     device: torch.device) -> torch.Tensor:
    """Index of the last real token per row, for right or left padding. Shape (B,)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    flipped = attention_mask.flip(-1).long()
    return length - 1 - flipped.argmax(-1)


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """(B, T, d) -> (B, d): first token, masked mean, or last real token."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)                           # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "last":
        idx = last_token_index(attention_mask, hidden.shape[0], hidden.shape[1], hidden.device)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"pooling={how!r}: expected one of {list(POOLINGS)}")


class MLMHead(nn.Module):
    """BERT's masked-LM head: logits = W_E LN(act(W h + b)) + b_V (Devlin et al., 2019)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = ACTIVATION_FUNCTIONS[config.activation]
        self.norm = build_norm(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))                     # (B, T, V)


class Pooler(nn.Module):
    """BERT's pooler: tanh(W h_[CLS] + b), the sentence vector the NSP head reads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))                                       # (B, d)


class ClassificationHead(nn.Module):
    """Linear scores over n labels, for a pooled vector (B, d) or every token (B, T, d).

    Serves next-sentence prediction (2 labels), sequence classification and token classification.
    """

    def __init__(self, d_in: int, n_labels: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.proj = nn.Linear(d_in, n_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(h))


class ValueHead(nn.Module):
    """A scalar per token: the value estimate in PPO, the reward in a reward model."""

    def __init__(self, d_in: int):
        super().__init__()
        self.proj = nn.Linear(d_in, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(-1)                                              # (B, T)


class ProjectionHead(nn.Module):
    """Maps a pooled vector into an embedding space for contrastive learning: z = W2 act(W1 h)."""

    def __init__(self, d_in: int, d_out: int, hidden: Optional[int] = None, normalize: bool = True):
        super().__init__()
        hidden = hidden or d_in
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
        self.normalize = normalize

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.net(h)                                                              # (B, d_out)
        return nn.functional.normalize(z, dim=-1) if self.normalize else z
