"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): weight-only integer quantization that minimises the layer
reconstruction error ‖W X − Ŵ X‖² instead of rounding each weight to its nearest grid point.

Columns are quantized left to right; each column's rounding error is compensated on the columns
not yet quantized by the OBS update of hessian.obs_sweep (with the damped Hessian H = (2/n) X Xᵀ,
blocks of 128 columns, lazy batch updates, the Cholesky form of H⁻¹: the paper's Algorithm 1).

Groups: the grid (scale, zero point) of a group of `group_size` columns is found from the CURRENT
weights — already updated by every column before it — when the sweep reaches the group's first
column, as the reference implementation does without `static_groups`. Columns are visited in
their natural order (no `act_order`). The codes come from intq.quantize_codes with that grid, so
`IntQuantized.dequantize()` is exactly the weight GPTQ settled on.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .calibrate import check_calibration, layerwise
from .errors import CompressError
from .hessian import HessianAccumulator, obs_sweep
from .targets import linear_targets
from .intq import IntQuantized, check_bits, check_group_size, dequantize_codes, grid_params, quantize_codes


class _GridSweep:
    """hessian.Sweep for GPTQ: each column rounded to its group's grid."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool, device):
        self.bits, self.g, self.symmetric = bits, group_size, symmetric
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)            # (out, in)
        self.scale = torch.zeros(rows, cols // group_size, device=device)                 # (out, groups)
        self.zero = torch.zeros(rows, cols // group_size, device=device)

    def start_block(self, i1, i2, block, hinv_block, weight):
        self.i1, self.block, self.weight = i1, block, weight

    def column(self, j, w, d):
        group = j // self.g
        if j % self.g == 0:
            # The group's grid from its current weights: at a block start the whole matrix is
            # current (nothing pending); inside a block the live block is, and the group fits in
            # it (_check_groups).
            cols = (self.weight[:, j: j + self.g] if j == self.i1
                    else self.block[:, j - self.i1: j - self.i1 + self.g])                 # (out, g)
            scale, zero = grid_params(cols, self.bits, self.symmetric)                    # (out, 1) each
            self.scale[:, group], self.zero[:, group] = scale[:, 0], zero[:, 0]
        scale, zero = self.scale[:, group], self.zero[:, group]                            # (out,)
        q = quantize_codes(w, scale, zero, self.bits)                                     # (out,) uint8
        self.codes[:, j] = q
        return dequantize_codes(q, scale, zero)


def _check_groups(cols: int, group_size: int, block_size: int) -> None:
    """Each group must start at a sweep-block start or end inside the block it starts in: past
    the block, the pending lazy update is not applied yet, so its weights would be stale."""
    if not (isinstance(block_size, int) and block_size > 0):
        raise CompressError(f"gptq: block_size={block_size!r}: expected a positive integer (128 in the paper)")
    for start in range(0, cols, group_size):
        offset = start % block_size
        if offset and offset + group_size > block_size:
            raise CompressError(f"gptq: block_size={block_size}: a group of group_size={group_size} columns "
                                f"starting at column {start} crosses a block end; expected a block_size "
                                f"that is a multiple or a divisor of group_size")


def gptq_quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4,
                        group_size: Optional[int] = 128, symmetric: bool = True, block_size: int = 128,
                        damp: float = 0.01) -> IntQuantized:
    """GPTQ of one weight (out, in) with its input Hessian (in, in); group_size None = per row."""
    check_bits(bits)
    if weight.dim() != 2:
        raise CompressError(f"gptq: weight.shape={tuple(weight.shape)}: expected a 2-D weight (out, in)")
    rows, cols = weight.shape
    g = check_group_size(group_size, cols, f"a weight of shape {tuple(weight.shape)}")
    _check_groups(cols, g, block_size)
    sweep = _GridSweep(rows, cols, bits, g, symmetric, weight.device)
    obs_sweep(weight, hessian, sweep, block_size=block_size, damp=damp)
    return IntQuantized(codes=sweep.codes, scale=sweep.scale, zero=sweep.zero, bits=bits, group_size=g,
                        symmetric=symmetric)


def gptq_model(model: nn.Module, calibration: torch.Tensor, *, bits: int = 4, group_size: Optional[int] = 128,
               symmetric: bool = True, block_size: int = 128, damp: float = 0.01, chunk_size: int = 8,
               progress: bool = True) -> dict[str, IntQuantized]:
    """GPTQ every block Linear (targets.linear_targets), block by block (calibrate.layerwise).

    Each layer's weight is set to its dequantized GPTQ value as soon as its block is done, so
    later blocks calibrate on the quantized model. Returns {linear path: IntQuantized}."""
    calibration = check_calibration(calibration, "gptq")
    check_bits(bits)
    for path, linear in linear_targets(model).items():      # fail before any block is changed
        g = check_group_size(group_size, linear.in_features, path)
        _check_groups(linear.in_features, g, block_size)
    results: dict[str, IntQuantized] = {}

    def observe(path, linear):
        return HessianAccumulator(linear.in_features, device=linear.weight.device)

    def update(index, block, stats):
        for path, (linear, acc) in stats.items():
            packed = gptq_quantize_layer(linear.weight, acc.hessian, bits=bits, group_size=group_size,
                                         symmetric=symmetric, block_size=block_size, damp=damp)
            linear.weight.data.copy_(packed.dequantize().to(linear.weight.dtype))
            results[path] = packed

    layerwise(model, calibration, observe, update, chunk_size=chunk_size, progress=progress, desc="gptq")
    return results
