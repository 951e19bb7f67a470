"""Pruning scores and the masks chosen from them. A mask is True where a weight is KEPT.

Scores (higher = more important):
- magnitude: S_ij = |W_ij| (Han et al. 2015, "Learning both Weights and Connections").
- Wanda: S_ij = |W_ij| · ‖X_j‖₂, with ‖X_j‖₂ the norm of input feature j over the calibration
  tokens (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs", eq. 1).

Comparison groups:
- per output row (Wanda's choice: "we compare weights on a per-output basis", sec. 3);
- per layer (the classic magnitude baseline; `prune` uses it for magnitude);
- N:M: at most N weights kept in every M consecutive input columns of a row (N:M sparsity as
  NVIDIA's sparse tensor cores define it; 2:4 keeps 2 of every 4, Mishra et al. 2021).

The number pruned is floor(sparsity · size) in each group, chosen by rank (topk), never by a
threshold, so ties cannot make the count drift: sparsity is exact.
"""
from __future__ import annotations

import torch

from .errors import CompressError


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()                                              # (out, in)


def wanda_score(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂: `column_norms` (in,) from hessian.ColumnNormAccumulator."""
    return weight.detach().float().abs() * column_norms.float().unsqueeze(0)          # (out, in)


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the last dim: False at the k lowest entries of every row of `score` (..., n)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(-1, score.topk(k, dim=-1, largest=False).indices, False)
    return keep


def unstructured_mask(score: torch.Tensor, sparsity: float, *, per_row: bool = True) -> torch.Tensor:
    """Keep-mask (out, in) pruning floor(sparsity · in) lowest scores in each row (per_row), or
    floor(sparsity · out · in) lowest over the whole matrix (per_row=False)."""
    check_sparsity(sparsity)
    if per_row:
        return lowest_k_mask(score, int(sparsity * score.shape[-1]))
    flat = score.reshape(1, -1)
    return lowest_k_mask(flat, int(sparsity * flat.shape[-1])).reshape(score.shape)


def n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (out, in) keeping the n highest scores in every group of m consecutive columns."""
    check_n_m(n, m, score.shape[-1])
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)                                        # (out, in/m, m)
    return lowest_k_mask(groups, m - n).reshape(rows, cols)


def check_sparsity(sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise CompressError(f"prune: sparsity={sparsity!r}: expected a fraction in [0, 1)")


def check_n_m(n: int, m: int, in_features: int, where: str = "") -> None:
    """N:M needs 0 < n < m and m dividing the layer's input columns."""
    if not (0 < n < m):
        raise CompressError(f"prune: n_m={n}:{m}: expected N:M with 0 < N < M (N kept of every M), e.g. '2:4'")
    if in_features % m:
        raise CompressError(f"prune: n_m={n}:{m}: {where or 'a layer'} has in_features={in_features}: "
                            f"expected a multiple of M={m}")


def parse_n_m(n_m) -> tuple[int, int] | None:
    """'2:4' or (2, 4) -> (2, 4); None -> None."""
    if n_m is None:
        return None
    parts = None
    if isinstance(n_m, str):
        pieces = n_m.split(":")
        if len(pieces) == 2 and all(p.strip().isdigit() for p in pieces):
            parts = tuple(int(p) for p in pieces)
    elif isinstance(n_m, (tuple, list)) and len(n_m) == 2 and all(
            isinstance(p, int) and not isinstance(p, bool) for p in n_m):
        parts = tuple(n_m)
    if parts is None or not 0 < parts[0] < parts[1]:
        raise CompressError(f"prune: n_m={n_m!r}: expected 'N:M' or (N, M) with 0 < N < M "
                            "(N weights kept of every M), e.g. '2:4'")
    return parts
