"""The layer Hessian and the OBS column sweep that GPTQ and SparseGPT share.

For a Linear y = W x with calibration inputs X (in, n), the layer-wise reconstruction objective
‖W X − Ŵ X‖²_F has, for every output row, the Hessian

    H = (2/n) Σ_t x_t x_tᵀ                        (in, in)

(Frantar et al. 2023, "GPTQ", eq. 1-2; Frantar & Alistarh 2023, "SparseGPT", sec. 3). Both
methods visit the columns of W left to right; when column j is fixed to a value q (a grid point,
or zero under a mask) the Optimal Brain Surgeon update (Hassibi & Stork 1993) spreads its error
over the columns not yet visited:

    δ = (w_j − q_j) / [H⁻¹]_jj,      W[:, j:] −= δ · [H⁻¹]_{j, j:}

with H⁻¹ taken as the upper Cholesky factor U of the damped inverse (so [H⁻¹]_{j, j:} is row j
of U: the inverse restricted to the columns left, without refactoring at each step; GPTQ sec. 3
"Cholesky reformulation"). Updates are applied lazily: inside a block of `block_size` columns
(128 in both papers) column by column, and to the columns after the block once per block, as one
matrix product ("lazy batch updates", GPTQ sec. 3).

`obs_sweep` is that loop, once; a `Sweep` says what happens at each column (GPTQ: round to the
grid; SparseGPT: zero where the mask says) and optionally at each block start (SparseGPT's
adaptive mask selection).

The Wanda statistic ‖X_j‖₂ (Sun et al. 2024) is accumulated here too, from the same inputs.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .errors import CompressError


class HessianAccumulator:
    """Running H = (2/n) Σ x xᵀ over every token fed to `add`.

    Accumulated in float32, as the reference implementations do: the running-mean form keeps the
    entries at the scale of x², so the relative error of the sum stays near √n·2⁻²⁴ (≈1e-5 at
    n = 65k tokens), far below the 1% damping added before the inverse, at half the memory and
    the fast matmul path. The inverse itself is taken in float64 (`inverse_cholesky`)."""

    def __init__(self, in_features: int, device=None):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # (in, in)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()                                       # (n, in)
        n = x.shape[0]
        if n == 0:
            return
        total = self.count + n
        # H_total = (count/total) H_old + (2/total) Σ_new x xᵀ, the running mean of GPTQ's add_batch.
        self.hessian.mul_(self.count / total)
        x = x * (2.0 / total) ** 0.5
        self.hessian.addmm_(x.T, x)
        self.count = total


class ColumnNormAccumulator:
    """Wanda's ‖X_j‖₂ per input column j: sqrt(Σ_t x_tj²) over every token fed to `add`.

    Accumulated in float64: a plain sum of squares (no running mean), so the extra mantissa is
    what keeps the sum exact to float32 output for any number of tokens."""

    def __init__(self, in_features: int, device=None):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)   # (in,)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])                                                # (n, in)
        self.sum_sq += x.double().pow(2).sum(0)
        self.count += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sum_sq.sqrt().float()                                             # (in,)


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹, and the dead-column mask.

    Dead columns (H_jj = 0: an input feature that is always zero) get H_jj = 1, as in both
    reference implementations; their weight columns carry no signal and are zeroed by the caller
    (`obs_sweep` does it). Damping λ = `damp` (1% in both papers) keeps H positive definite.
    Returns U (in, in) float32 and dead (in,) bool."""
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise CompressError(f"hessian: damp={damp!r}: expected a number >= 0 (0.01 is the papers')")
    H = hessian.double().clone()                                                      # (in, in)
    dead = torch.diagonal(H) == 0                                                     # (in,)
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    try:
        L = torch.linalg.cholesky(H)                                                  # H = L Lᵀ
        hinv = torch.cholesky_inverse(L)                                              # (in, in)
        U = torch.linalg.cholesky(hinv, upper=True)                                   # H⁻¹ = Uᵀ U
    except torch.linalg.LinAlgError as exc:
        raise CompressError(f"hessian: damp={damp!r}: the damped Hessian is not positive definite; "
                            "expected a larger damp or more calibration tokens") from exc
    return U.float(), dead


class Sweep(Protocol):
    """What the OBS sweep does with each column (and, optionally, at each block start)."""

    def start_block(self, i1: int, i2: int, block: torch.Tensor, hinv_block: torch.Tensor,
                    weight: torch.Tensor) -> None:
        """Called before columns i1..i2-1 are visited. `block` (out, i2-i1) is the live block of
        weights the sweep updates in place (so column j of it is current when the sweep reaches
        j); `hinv_block` (i2-i1, i2-i1) the matching block of U; `weight` (out, in) the whole
        matrix, whose columns from i1 on are current now (all lazy updates applied) but are not
        updated during the block (`block` is)."""

    def column(self, j: int, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Column j's current weights w (out,) and [U]_jj; returns the value it is fixed to (out,)."""


def obs_sweep(weight: torch.Tensor, hessian: torch.Tensor, sweep: Sweep, *, block_size: int = 128,
              damp: float = 0.01) -> torch.Tensor:
    """The OBS column sweep with lazy batch updates (module docstring); returns Ŵ (out, in) float32.

    GPTQ's Algorithm 1 and SparseGPT's Algorithm 1 both have this loop; only the per-column rule
    (and SparseGPT's per-block mask selection) differ, and they come from `sweep`."""
    if not (isinstance(block_size, int) and block_size > 0):
        raise CompressError(f"obs_sweep: block_size={block_size!r}: expected a positive integer (128 in the papers)")
    W = weight.detach().float().clone()                                               # (out, in)
    rows, cols = W.shape
    if hessian.shape != (cols, cols):
        raise CompressError(f"obs_sweep: hessian shape {tuple(hessian.shape)}: expected ({cols}, {cols}) "
                            "for a weight with that many input columns")
    U, dead = inverse_cholesky(hessian.to(W.device), damp)                            # (in, in)
    W[:, dead] = 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = W[:, i1:i2].clone()                                                   # (out, b) live
        errors = torch.zeros_like(block)                                              # (out, b)
        U1 = U[i1:i2, i1:i2]                                                          # (b, b)
        sweep.start_block(i1, i2, block, U1, W)
        for i in range(i2 - i1):
            w, d = block[:, i], U1[i, i]
            q = sweep.column(i1 + i, w.clone(), d)                                    # (out,)
            err = (w - q) / d                                                         # (out,)
            # Column i itself ends at q; the columns after it in the block absorb the error now.
            block[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            block[:, i] = q
            errors[:, i] = err
        W[:, i1:i2] = block
        W[:, i2:] -= errors @ U[i1:i2, i2:]                                           # lazy: (out, b)(b, rest)
    return W


def layer_error(weight: torch.Tensor, new_weight: torch.Tensor, inputs: torch.Tensor) -> float:
    """‖W X − Ŵ X‖²_F for inputs X given as rows (n, in): the objective both papers minimise."""
    diff = (weight.double() - new_weight.double()) @ inputs.reshape(-1, inputs.shape[-1]).double().T
    return float(diff.pow(2).sum())


def hessian_of(inputs: torch.Tensor) -> torch.Tensor:
    """H = (2/n) Σ x xᵀ of a batch of input rows (n, in) in one call (single-layer use, tests)."""
    acc = HessianAccumulator(inputs.shape[-1], device=inputs.device)
    acc.add(inputs)
    return acc.hessian                                                                # (in, in)
