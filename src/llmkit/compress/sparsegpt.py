"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): prune a layer and update the weights it keeps so that ‖W X − Ŵ X‖² stays
small, with the OBS update of hessian.obs_sweep (damped Hessian, blocks of 128 columns, lazy
batch updates; the paper's Algorithm 1).

Adaptive mask selection (sec. 3.3): the mask is chosen as the sweep goes, from the weights as
already updated, by the OBS saliency

    ε_ij = w_ij² / [H⁻¹]_jj²            (U_jj of the Cholesky factor stands for [H⁻¹]_jj)

- unstructured: at each block start, over the whole block (every row, its 128 columns), the
  lowest ε are pruned, as the reference code does. The count per block is
  floor(s·end) − floor(s·start) of the block's entry range, so the layer's total is exactly
  floor(s · out · in) and the per-block share stays s;
- N:M: at the first column of each group of M columns, the M − N lowest ε of each row in the
  group are pruned (N kept of every M, masks.py's convention; M must divide the block size).

A pruned column value is 0; its OBS error (w_ij − 0)/[H⁻¹]_jj flows into the columns after it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import CompressError
from .hessian import obs_sweep
from .masks import check_n_m, check_sparsity, lowest_k_mask


class _MaskSweep:
    """hessian.Sweep for SparseGPT: each column zeroed where the adaptive mask says."""

    def __init__(self, rows: int, cols: int, sparsity: float, n_m: Optional[tuple[int, int]], device):
        self.sparsity, self.n_m, self.cols = sparsity, n_m, cols
        self.keep = torch.ones(rows, cols, dtype=torch.bool, device=device)                # (out, in)

    def _saliency(self, block, hinv_block, a, b):
        d = torch.diagonal(hinv_block)[a:b]                                                # (b - a,)
        return block[:, a:b].pow(2) / d.pow(2).unsqueeze(0)                                 # (out, b - a)

    def start_block(self, i1, i2, block, hinv_block, weight):
        self.i1, self.block, self.hinv_block = i1, block, hinv_block
        if self.n_m is None:
            rows = block.shape[0]
            k = int(self.sparsity * rows * i2) - int(self.sparsity * rows * i1)
            score = self._saliency(block, hinv_block, 0, i2 - i1).reshape(1, -1)
            self.keep[:, i1:i2] = lowest_k_mask(score, k).reshape(rows, i2 - i1)

    def column(self, j, w, d):
        if self.n_m is not None:
            n, m = self.n_m
            if (j - self.i1) % m == 0:
                a = j - self.i1
                score = self._saliency(self.block, self.hinv_block, a, a + m)              # (out, m)
                self.keep[:, j:j + m] = lowest_k_mask(score, m - n)
        return w * self.keep[:, j]


def check_sweep_args(block_size, damp, n_m: Optional[tuple[int, int]]) -> None:
    """block_size a positive integer (a multiple of M for N:M, so no group crosses a block); damp >= 0."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise CompressError(f"sparsegpt: block_size={block_size!r}: expected a positive integer (128 in the paper)")
    if n_m is not None and block_size % n_m[1]:
        raise CompressError(f"sparsegpt: block_size={block_size}: expected a multiple of M={n_m[1]} "
                            "so that no N:M group crosses a block")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise CompressError(f"sparsegpt: damp={damp!r}: expected a number >= 0 (0.01 in the paper)")


def sparsegpt_prune_layer(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5,
                          n_m: Optional[tuple[int, int]] = None, block_size: int = 128,
                          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of one weight (out, in) with its input Hessian (in, in).

    `n_m` = (N, M) keeps N of every M consecutive columns (then `sparsity` is not used).
    Returns (new weight (out, in) in weight's dtype, keep-mask (out, in) bool); new == new * mask."""
    check_sparsity(sparsity)
    if weight.dim() != 2:
        raise CompressError(f"sparsegpt: weight.shape={tuple(weight.shape)}: expected a 2-D weight (out, in)")
    rows, cols = weight.shape
    if n_m is not None:
        check_n_m(*n_m, cols)
    check_sweep_args(block_size, damp, n_m)
    sweep = _MaskSweep(rows, cols, sparsity, n_m, weight.device)
    new = obs_sweep(weight, hessian, sweep, block_size=block_size, damp=damp)              # (out, in)
    return new.to(weight.dtype), sweep.keep
