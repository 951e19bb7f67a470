"""AdaLoRA's rank budget: the cubic schedule, importance scores and the orthogonality penalty
(Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", eqs. 4, 8-12).

Budget (total kept singular values over all adapted matrices), steps t = 1..T:

    b(t) = b0                                                     t <  t_i
         = b_T + (b0 - b_T) · (1 - (t - t_i) / (T - t_i - t_f))^3    t_i <= t < T - t_f
         = b_T                                                    t >= T - t_f

Importance of each parameter w, with I = |w · ∂L/∂w| (sensitivity):
    Ī_t = β1 Ī_{t-1} + (1 - β1) I_t            (smoothed sensitivity)
    Ū_t = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|    (uncertainty)
    s(w) = Ī_t · Ū_t
and of triplet i of a matrix (λ_i, P_{:,i}, Q_{i,:}):
    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).
The b(t) triplets with the largest S over all matrices keep their λ; the rest are set to 0.

Orthogonality regulariser, added to the loss with weight γ:
    R(P, Q) = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2.
"""
from __future__ import annotations

import torch


def budget_at(t: int, b0: int, b_final: int, t_init: int, t_final: int, total: int) -> int:
    """The paper's cubic schedule b(t) (rounded down to an integer count of triplets)."""
    if t < t_init:
        return b0
    if t >= total - t_final:
        return b_final
    progress = (t - t_init) / (total - t_init - t_final)
    return int(b_final + (b0 - b_final) * (1.0 - progress) ** 3)


@torch.no_grad()
def update_importance(param: torch.Tensor, ibar: torch.Tensor, ubar: torch.Tensor,
                      beta1: float, beta2: float) -> None:
    """One step of the smoothed sensitivity Ī and uncertainty Ū of `param` (in place)."""
    if param.grad is None:
        return
    sensitivity = (param * param.grad).abs()
    ibar.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
    ubar.mul_(beta2).add_((sensitivity - ibar).abs(), alpha=1 - beta2)


def orthogonality(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 for P (out, r), Q (r, in)."""
    eye = torch.eye(P.shape[1], device=P.device, dtype=P.dtype)
    return ((P.t() @ P - eye) ** 2).sum() + ((Q @ Q.t() - eye) ** 2).sum()
