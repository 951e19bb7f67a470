"""`prune(model, method, sparsity)`: unstructured or N:M pruning of every block Linear, in place.

Methods (scores and groups in masks.py, the OBS method in sparsegpt.py):
- "magnitude": |W|, compared over the whole layer (the classic baseline; N:M within its groups).
  Needs no calibration.
- "wanda" (Sun et al. 2024): |W_ij|·‖X_j‖₂, compared within each output row (or N:M group).
- "sparsegpt" (Frantar & Alistarh 2023): OBS reconstruction with adaptive masks.

Wanda and SparseGPT run layer by layer (calibrate.layerwise): the statistics of block i come from
the outputs of the already pruned blocks before it.

N:M ("2:4" or (2, 4)) keeps N of every M consecutive input weights of a row; it replaces
`sparsity` (the layer sparsity is then (M − N)/M).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .calibrate import check_calibration, layerwise
from .errors import CompressError
from .hessian import ColumnNormAccumulator, HessianAccumulator
from .masks import check_n_m, check_sparsity, magnitude_score, n_m_mask, parse_n_m, unstructured_mask, wanda_score
from .sparsegpt import check_sweep_args, sparsegpt_prune_layer
from .targets import linear_targets

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


def _mask(score: torch.Tensor, sparsity: float, n_m, per_row: bool) -> torch.Tensor:
    if n_m is not None:
        return n_m_mask(score, *n_m)
    return unstructured_mask(score, sparsity, per_row=per_row)


def _apply(linear: nn.Linear, new_weight: torch.Tensor) -> None:
    linear.weight.data.copy_(new_weight.to(linear.weight.dtype))


def prune(model: nn.Module, method: str, sparsity: float = 0.5, *,
          n_m: Union[str, tuple[int, int], None] = None, calibration: Optional[torch.Tensor] = None,
          block_size: int = 128, damp: float = 0.01, chunk_size: int = 8, progress: bool = True) -> dict:
    """Prune the model's block Linears in place; returns the report
    {"method", "n_m", "layers": {path: sparsity}, "sparsity": zeros / weights over those layers}."""
    if method not in PRUNE_METHODS:
        raise CompressError(f"prune: method={method!r}: expected one of {', '.join(PRUNE_METHODS)}")
    check_sparsity(sparsity)
    pattern = parse_n_m(n_m)
    targets = linear_targets(model)
    if pattern is not None:
        for path, linear in targets.items():
            check_n_m(*pattern, linear.in_features, path)

    if method == "magnitude":
        with torch.no_grad():
            for linear in targets.values():
                keep = _mask(magnitude_score(linear.weight), sparsity, pattern, per_row=False)
                _apply(linear, linear.weight * keep)
    else:
        calibration = check_calibration(calibration, f"prune (method={method!r})")
        if method == "sparsegpt":
            check_sweep_args(block_size, damp, pattern)
        accumulator = ColumnNormAccumulator if method == "wanda" else HessianAccumulator

        def observe(path, linear):
            return accumulator(linear.in_features, device=linear.weight.device)

        def update(index, block, stats):
            for linear, acc in stats.values():
                if method == "wanda":
                    keep = _mask(wanda_score(linear.weight, acc.norms()), sparsity, pattern, per_row=True)
                    _apply(linear, linear.weight * keep)
                else:
                    new, _ = sparsegpt_prune_layer(linear.weight, acc.hessian, sparsity=sparsity, n_m=pattern,
                                                   block_size=block_size, damp=damp)
                    _apply(linear, new)

        layerwise(model, calibration, observe, update, chunk_size=chunk_size, progress=progress, desc=method)
    return sparsity_report(targets, method, pattern)


def sparsity_report(targets: dict[str, nn.Linear], method: str, n_m) -> dict:
    """Sparsity measured on the weights themselves: exact zeros / entries, per layer and overall."""
    zeros = {path: int((linear.weight == 0).sum()) for path, linear in targets.items()}
    total = sum(linear.weight.numel() for linear in targets.values())
    return {"method": method, "n_m": None if n_m is None else f"{n_m[0]}:{n_m[1]}",
            "layers": {path: zeros[path] / targets[path].weight.numel() for path in targets},
            "sparsity": sum(zeros.values()) / total if total else 0.0}
