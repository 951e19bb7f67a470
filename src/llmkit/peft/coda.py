"""CoDA (Lei et al. 2023, "Conditional Adapters: Parameter-efficient Transfer Learning with Fast
Inference"): a parallel adapter on every token, and the frozen sublayer on k = ceil(n / r) of them.

For a sublayer F (attention or FFN) and hidden states X ∈ R^{n×d} of one sequence:

    s = X w                                   router scores, w ∈ R^d
    λ = SoftTopK_ε(s, k) = argmax_{λ ∈ [0,1]^n, Σλ = k}  sᵀλ + ε H(λ),   H(λ) = -Σ λ_i log λ_i
      => λ_i = min(1, exp((s_i - τ) / ε)),  τ such that Σ_i λ_i = k
    I = top-k(λ)                              the k selected tokens, in sequence order
    out_i = λ_i F(X_I)_i  for i ∈ I,  0 otherwise;   plus  s_a · W_up σ(W_down x_i)  for every i

τ is found by bisection, then recomputed in closed form on the unsaturated set U (the saturated
set S has λ = 1): τ = ε log Σ_{i∈U} exp(s_i / ε) - ε log(k - |S|), so λ is differentiable in s.
As ε -> 0, λ becomes the hard top-k indicator. F really runs on k tokens (attention among the
selected tokens, with the mask and rotary tables gathered), training and inference alike: the
speed-up the paper reports. The selection reads the whole sequence, so CoDA takes bidirectional
stacks only (encoders; BART's encoder); with a causal stack an early token's route would depend
on later tokens.

Trainable parameters per block: d per routed sublayer (w) + the parallel adapter's 2·d·m + m + d
per adapted sublayer (bottleneck.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .bottleneck import PARALLEL_SLOTS, ParallelAdapter, ParallelAdapterConfig, hidden_size
from .errors import PeftError
from .registry import SiteContext, register

ROUTE_SLOTS = {"mlp": ["route_mlp"], "attn": ["route_attn"], "both": ["route_attn", "route_mlp"]}


@dataclass
class CodaConfig(ParallelAdapterConfig):
    token_reduction: int = 4                 # r: the sublayer sees k = ceil(n / r) tokens
    epsilon: float = 1.0                     # ε of the soft top-k
    sublayer: str = "both"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.token_reduction, int) or self.token_reduction < 1:
            raise PeftError(f"token_reduction={self.token_reduction!r}: expected an integer >= 1")
        if not isinstance(self.epsilon, (int, float)) or self.epsilon <= 0:
            raise PeftError(f"epsilon={self.epsilon!r}: expected a positive number")


def soft_top_k(scores: torch.Tensor, k: int, epsilon: float, iterations: int = 60) -> torch.Tensor:
    """λ (B, n) = min(1, exp((s - τ)/ε)) with Σ λ = k per row, for scores (B, n) and 1 <= k <= n."""
    s = scores.float()
    n = s.shape[-1]
    if k >= n:
        return torch.ones_like(s)
    with torch.no_grad():                                 # bracket τ, then bisect: Σλ falls as τ rises
        lo = s.min(-1, keepdim=True).values               # Σλ = n >= k
        hi = s.max(-1, keepdim=True).values + epsilon * math.log(n / k)   # Σλ <= k
        for _ in range(iterations):
            mid = (lo + hi) / 2
            too_many = torch.exp(((s - mid) / epsilon).clamp(max=0)).sum(-1, keepdim=True) > k
            lo, hi = torch.where(too_many, mid, lo), torch.where(too_many, hi, mid)
        saturated = s >= hi                               # λ = 1 exactly
        free = k - saturated.sum(-1, keepdim=True)        # mass left for the unsaturated set
    z = torch.where(saturated, torch.full_like(s, -torch.inf), s / epsilon)
    tau = epsilon * (torch.logsumexp(z, -1, keepdim=True) - torch.log(free.clamp(min=1).float()))
    tau = torch.where(free > 0, tau, hi)
    # exp(min(0, .)) rather than exp(.).clamp(max=1): the same values, but a saturated token's
    # exponent never overflows, so its zero gradient stays zero (not inf * 0 = nan) at small ε
    return torch.exp(((s - tau) / epsilon).clamp(max=0))                              # (B, n)


class Router(nn.Module):
    """The route slot's adapter: scores tokens, runs `sublayer` on the top k, weights by λ."""

    def __init__(self, d: int, token_reduction: int, epsilon: float, *, device=None, dtype=None):
        super().__init__()
        self.token_reduction, self.epsilon = token_reduction, epsilon
        self.router = nn.Parameter(torch.randn(d, device=device, dtype=dtype) / math.sqrt(d))   # w

    def forward(self, h: torch.Tensor, sublayer) -> torch.Tensor:
        B, n, d = h.shape
        k = min(n, math.ceil(n / self.token_reduction))
        weights = soft_top_k(h.to(self.router.dtype) @ self.router, k, self.epsilon)   # (B, n)
        index = weights.topk(k, dim=-1, sorted=False).indices.sort(-1).values          # (B, k)
        chosen = h.gather(1, index[..., None].expand(B, k, d))                         # (B, k, d)
        y = sublayer(chosen, index)                                                    # (B, k, d)
        w = weights.gather(1, index).to(y.dtype)[..., None]                            # (B, k, 1)
        return torch.zeros_like(h).scatter(1, index[..., None].expand(B, k, d), w * y)  # (B, n, d)


@register
class Coda(ParallelAdapter):
    name = "coda"
    needs = "a bidirectional block (an encoder: BERT, BART's encoder); a causal stack would route on future tokens"
    config_class = CodaConfig
    placement, slot, default_targets = "slot", "route_mlp", None

    def accepts(self, module: nn.Module, config=None) -> bool:
        return super().accepts(module, config) and not module.causal

    def slots_for(self, config: CodaConfig) -> list[str]:
        return [*ROUTE_SLOTS[config.sublayer], *PARALLEL_SLOTS[config.sublayer]]

    def adapter_for(self, block: nn.Module, config: CodaConfig, site: SiteContext) -> nn.Module:
        if site.path.rpartition(".")[2].startswith("route_"):
            w = block.mlp.down_proj.weight
            return Router(hidden_size(block), config.token_reduction, config.epsilon, device=w.device, dtype=w.dtype)
        return self.make_adapter(block, config)                  # the parallel adapter's bottleneck

    def count_for(self, block: nn.Module, config: CodaConfig, site: SiteContext) -> int:
        if site.path.rpartition(".")[2].startswith("route_"):
            return hidden_size(block)
        return self.trainable_count(block, config)
