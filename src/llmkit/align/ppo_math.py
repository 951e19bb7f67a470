"""PPO-RLHF as pure functions of tensors (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms"; Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et
al. 2022). Shapes: B completions of T tokens; `mask` (B, T) is 1 on the completion's real tokens
(up to and including its stop token), 0 on padding after it.

KL to the reference per sampled token, from log-probs of the token actually sampled
(Schulman 2020, "Approximating KL Divergence"), with δ_t = log π_ref(y_t) − log π(y_t):
    k1 = −δ_t                 unbiased, may be negative per token
    k3 = (e^δ_t − 1) − δ_t    unbiased for KL(π‖π_ref) too, and never negative
Rewards per token: r_t = −β·KL_t, plus the reward model's score at the last real token.
GAE (Schulman et al. 2016): δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1}  (V_T = 0),
returns R_t = A_t + V_t. Whitening: (x − mean) / sqrt(var + 1e-8) over the masked entries.
Policy loss, ρ_t = exp(log π_θ − log π_old):   max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), masked mean.
Value loss: ½ max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²), masked mean.
KL controllers: fixed β, or adaptive (Ziegler et al.): e = clip(KL / target − 1, −0.2, 0.2),
β ← β (1 + e · n / horizon) after a batch of n samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)              # Bessel's correction, as TRL and OpenRLHF whiten
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over mask (shift_mean=False keeps the mean: rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """KL_t (B, T) of the sampled tokens: "k1" = log π − log π_ref, "k3" = (e^δ − 1) − δ."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        delta = ref_logps - logps
        return torch.expm1(delta) - delta
    raise ValueError(f"kl_estimator={estimator!r}: expected 'k1' or 'k3'")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of its last real token (B,); a row with no token gets −1 (an error)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(1)
    if (last < 0).any():
        rows = (last < 0).nonzero().squeeze(1).tolist()
        raise ValueError(f"completions {rows[:8]} have no real token: the reward needs a last real token")
    return last


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r (B, T) = −β·KL_t on real tokens, plus each row's score (B,) at its last real token."""
    rewards = -beta * kl * mask.to(kl.dtype)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), by the backward recursion; padding gets 0 and the value
    after a row's last real token counts as 0."""
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: masked mean of max(−A ρ, −A clip(ρ, 1−ε, 1+ε)); also clipfrac, approx KL
    (½ mean (log ρ)²) and the mean ratio."""
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
             "approxkl": (0.5 * masked_mean(log_ratio ** 2, mask)).detach(),
             "ratio": masked_mean(ratio, mask).detach()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """½ masked mean of max((V − R)², (clip(V, V_old ± ε) − R)²); also the clipped fraction."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    return loss, {"clipfrac": masked_mean((b > a).float(), mask).detach()}


@dataclass
class FixedKL:
    """β that never changes."""
    beta: float

    def update(self, kl: float, n: int) -> float:
        return self.beta


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s proportional controller towards `target` KL over `horizon` samples."""
    beta: float
    target: float
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon
        return self.beta
