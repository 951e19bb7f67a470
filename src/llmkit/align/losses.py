"""Preference losses as pure functions of log-probabilities (or reward scores).

Notation: for a prompt x with a preferred completion y_w ("chosen") and a dispreferred y_l
("rejected"), π is the policy, π_ref the frozen reference, and

    r_θ(x, y) = log π(y|x) − log π_ref(y|x)          the implicit reward's log-ratio
    h         = r_θ(x, y_w) − r_θ(x, y_l)            the preference log-ratio

Every function takes per-example tensors (B,) and returns per-example losses (B,) (take .mean()
for the batch loss) plus the rewards the metrics use; `preference_metrics` names them as TRL does
(rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, margin: Optional[torch.Tensor] = None,
                center_coef: float = 0.0, label: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bradley–Terry reward-model loss (Bradley & Terry, 1952; Ouyang et al., 2022, "Training language
    models to follow instructions with human feedback"):

        L = −log σ(s_w − s_l − m) + c · (s_w + s_l)²

    s = the scalar scores (B,); m an optional per-pair margin (B,) (Llama 2's margin loss, Touvron
    et al., 2023); c > 0 centres the rewards around zero (Eisenstein et al., 2023). A soft `label`
    p = P(chosen ≻ rejected) (B,) (an AI judge's, RLAIF: Lee et al., 2023) gives the cross-entropy
    −p log σ(Δ) − (1 − p) log σ(−Δ), which is the loss above at p = 1. Returns (B,)."""
    diff = chosen_scores - rejected_scores                                          # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)                                                      # (B,)
    if label is not None:
        p = label.to(diff.dtype)
        loss = p * loss - (1 - p) * F.logsigmoid(-diff)
    if center_coef:
        loss = loss + center_coef * (chosen_scores + rejected_scores) ** 2
    return loss


def _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    chosen = policy_chosen - ref_chosen                                             # (B,) r_θ(x, y_w)
    rejected = policy_rejected - ref_rejected                                       # (B,) r_θ(x, y_l)
    return chosen, rejected


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model"):

        L_DPO   = −log σ(β h)
        L_cDPO  = −(1 − ε) log σ(β h) − ε log σ(−β h)    label_smoothing = ε: each label flipped with
                                                          probability ε (Mitchell, 2023, "A note on DPO
                                                          with noisy preferences", conservative DPO)
        L_hinge = max(0, 1 − β h)                         loss_type="hinge" (SLiC, Zhao et al., 2023,
                                                          "SLiC-HF", with margin 1/β)

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·r_θ, detached."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r}: expected a float in [0, 0.5)")
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    h = chosen - rejected                                                           # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only, not 'hinge'")
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected 'sigmoid' or 'hinge' (IPO is ipo_loss)")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, tau: float = 0.1, chosen_lengths: Optional[torch.Tensor] = None,
             rejected_lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Identity Preference Optimisation (Azar et al., 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences"):

        L_IPO = (h − 1/(2τ))²

    a squared loss whose optimum h* = 1/(2τ) stays finite even for deterministic preferences, where
    DPO's −log σ(βh) pushes h to infinity. Summed log-probs by default; with `chosen_lengths` and
    `rejected_lengths` (token counts, (B,)) every log-prob is divided by its length first (the
    length-normalised form TRL uses). Returns (losses, chosen_rewards, rejected_rewards) with
    rewards τ·r_θ, detached."""
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo_loss: give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        cl, rl = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
        policy_chosen, ref_chosen = policy_chosen / cl, ref_chosen / cl
        policy_rejected, ref_rejected = policy_rejected / rl, ref_rejected / rl
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (chosen - rejected - 1 / (2 * tau)) ** 2                               # (B,)
    return losses, tau * chosen.detach(), tau * rejected.detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *, beta: float = 0.1,
             lambda_d: float = 1.0, lambda_u: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman–Tversky Optimization (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization"), for unpaired completions labelled desirable or undesirable:

        z_ref = max(0, mean_j [log π(y_j|x_i) − log π_ref(y_j|x_i)])   over mismatched pairs (i ≠ j),
                detached: an estimate of KL(π ‖ π_ref) that only sets the reference point
        L = λ_D (1 − σ(β (r_θ − z_ref)))   for desirable y
        L = λ_U (1 − σ(β (z_ref − r_θ)))   for undesirable y

    policy_logps, ref_logps, desirable (bool): (B,); *_kl_logps: (M,) log-probs of the mismatched
    pairs. Returns (losses (B,), rewards β·r_θ (B,) detached, z_ref ())."""
    if policy_kl_logps.numel() == 0:
        raise ValueError("kto_loss: no mismatched pairs to estimate z_ref (KL): KTO needs a batch of at "
                         "least 2 examples")
    z_ref = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)          # ()
    ratio = policy_logps - ref_logps                                               # (B,)
    desirable = desirable.bool()
    losses = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (ratio - z_ref))),
                         lambda_u * (1 - torch.sigmoid(beta * (z_ref - ratio))))
    return losses, beta * ratio.detach(), z_ref


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable at both ends (Mächler, 2012): log(−expm1(x)) for x > −ln 2,
    log1p(−eˣ) below. x is clamped to at most −1e-6 so a log-prob of exactly 0 stays finite."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, lam: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Odds Ratio Preference Optimization (Hong et al., 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model"), on length-averaged log-probs ℓ = log π(y|x) / |y|:

        odds(y|x)  = P / (1 − P),  P = e^ℓ   so   log odds = ℓ − log(1 − e^ℓ)
        L = −ℓ_w + λ · (−log σ(log odds(y_w|x) − log odds(y_l|x)))

    the SFT negative log-likelihood of the chosen completion plus the odds-ratio penalty; no
    reference model. Returns (losses, chosen_rewards λ·ℓ_w, rejected_rewards λ·ℓ_l, log_odds_ratio)."""
    log_odds = (chosen_mean_logps - log1mexp(chosen_mean_logps)) - (
        rejected_mean_logps - log1mexp(rejected_mean_logps))                        # (B,)
    losses = -chosen_mean_logps - lam * F.logsigmoid(log_odds)                      # (B,)
    return losses, lam * chosen_mean_logps.detach(), lam * rejected_mean_logps.detach(), log_odds.detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       chosen_logps: Optional[torch.Tensor] = None,
                       rejected_logps: Optional[torch.Tensor] = None) -> dict[str, float]:
    """TRL-named batch means. rewards/accuracies counts chosen > rejected strictly: ties count as wrong."""
    metrics = {"rewards/chosen": chosen_rewards.mean().item(),
               "rewards/rejected": rejected_rewards.mean().item(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item()}
    if chosen_logps is not None:
        metrics["logps/chosen"] = chosen_logps.detach().mean().item()
    if rejected_logps is not None:
        metrics["logps/rejected"] = rejected_logps.detach().mean().item()
    return metrics
