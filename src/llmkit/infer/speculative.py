"""Speculative decoding as pure functions of tensors: the verification rule that decides how many
draft tokens the target model keeps, and a draft-free proposer (prompt lookup). The engine runs the
models; these functions only read their distributions.

Shapes: γ draft tokens x_0 … x_{γ-1} over a vocabulary of V; the target scores all γ positions and
one more (the bonus position) in a single forward pass.
    target_probs p: (γ+1, V)     p_i = p(· | prefix, x_<i)
    draft_probs  q: (γ, V)       q_i = q(· | prefix, x_<i), the distribution x_i was drawn from
    draft_tokens x: (γ,)         long
Batched variants take a leading B on every argument.

Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling", Algorithm 2):
    u_i ~ U[0, 1);  accept x_i  iff  u_i < min(1, p_i(x_i) / q_i(x_i))      (computed as u_i·q_i(x_i) < p_i(x_i))
    n = the number of leading accepted drafts (stop at the first rejection)
    n < γ:  next ~ norm(max(0, p_n − q_n))          (the residual; if it sums to 0, next ~ p_n)
    n = γ:  next ~ p_γ                              (the bonus token)
Every emitted token is then distributed exactly as the target's p (both papers prove it): with
β = Σ_t min(p(t), q(t)) the acceptance probability, and Σ_t max(0, p(t) − q(t)) = 1 − β,
    P(t) = q(t)·min(1, p(t)/q(t)) + (1 − β) · max(0, p(t) − q(t)) / (1 − β)
         = min(p(t), q(t)) + max(0, p(t) − q(t)) = p(t).
p and q must be the distributions actually sampled from (after temperature, top-k, top-p): the
output then follows the processed target distribution. A deterministic proposer (n-gram lookup, a
greedy draft) has q_i = one_hot(x_i), i.e. `torch.nn.functional.one_hot(draft_tokens, V).float()`:
x_i is kept with probability p_i(x_i), and the residual is p_i with x_i removed.
All randomness (the γ uniforms, then one multinomial draw) comes from the `generator` passed in, so
a seeded generator reproduces the result.

Greedy verification (the temperature → 0 limit of the rule above):
    accept x_i  iff  argmax p_i = x_i;   next = argmax p_n  (n = γ: the bonus position)
so greedy speculative decoding emits exactly the tokens of target greedy decoding (argmax takes the
first maximum, as `generation.pick_tokens` does).

Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; vLLM's n-gram proposer; the same
idea as Yang et al. 2023, "Inference with Reference: Lossless Acceleration of Large Language
Models"): for n = n_max … n_min, find the latest j < L − n with tokens[j : j+n] = tokens[L−n : L]
(L = len(tokens)); propose tokens[j+n : j+n+k]. The first n that matches wins; no match gives [].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _check_shapes(target: torch.Tensor, draft: Optional[torch.Tensor], draft_tokens: torch.Tensor,
                  batched: bool) -> None:
    lead = 1 if batched else 0
    want_t = "(B, γ+1, V)" if batched else "(γ+1, V)"
    want_q = "(B, γ, V)" if batched else "(γ, V)"
    want_x = "(B, γ)" if batched else "(γ,)"
    if target.dim() != 2 + lead:
        raise ValueError(f"target_probs.shape={tuple(target.shape)}: expected {want_t}")
    if draft_tokens.dim() != 1 + lead or draft_tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"draft_tokens.shape={tuple(draft_tokens.shape)}, dtype={draft_tokens.dtype}: "
                         f"expected integer tokens of shape {want_x}")
    gamma = draft_tokens.shape[-1]
    if target.shape[:lead] != draft_tokens.shape[:lead] or target.shape[-2] != gamma + 1:
        raise ValueError(f"target_probs.shape={tuple(target.shape)}: expected {want_t} with γ+1 = {gamma + 1} "
                         f"(draft_tokens.shape={tuple(draft_tokens.shape)})")
    if draft is not None and tuple(draft.shape) != (*target.shape[:lead], gamma, target.shape[-1]):
        raise ValueError(f"draft_probs.shape={tuple(draft.shape)}: expected {want_q} = "
                         f"{(*target.shape[:lead], gamma, target.shape[-1])}")


def accept_draft_batched(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                         generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for B sequences at once (formulas in the module docstring).

    target_probs (B, γ+1, V), draft_probs (B, γ, V), draft_tokens (B, γ) ->
    (num_accepted (B,) long in [0, γ], next_tokens (B,) long), on target_probs' device.
    Sequence b emits draft_tokens[b, :num_accepted[b]] then next_tokens[b]."""
    _check_shapes(target_probs, draft_probs, draft_tokens, batched=True)
    B, gamma_1, V = target_probs.shape
    gamma = gamma_1 - 1
    device = target_probs.device
    rng_device = generator.device if generator is not None else device
    p = target_probs.float()                                                         # (B, γ+1, V)
    q = draft_probs.to(device=device, dtype=torch.float32)                          # (B, γ, V)
    x = draft_tokens.to(device=device, dtype=torch.long)                            # (B, γ)

    p_x = p[:, :gamma].gather(-1, x.unsqueeze(-1)).squeeze(-1)                      # (B, γ)  p_i(x_i)
    q_x = q.gather(-1, x.unsqueeze(-1)).squeeze(-1)                                 # (B, γ)  q_i(x_i)
    u = torch.rand((B, gamma), generator=generator, device=rng_device).to(device)   # (B, γ)
    accepted = u * q_x < p_x                                  # (B, γ)  u < min(1, p/q); never when p = 0
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)                      # (B,)  leading run of acceptances

    # The residual at position n; a zero row of q at the bonus position makes it p_γ there.
    q_pad = torch.cat([q, q.new_zeros(B, 1, V)], dim=1)                             # (B, γ+1, V)
    idx = num_accepted.view(B, 1, 1).expand(B, 1, V)                                # (B, 1, V)
    p_n = p.gather(1, idx).squeeze(1)                                                # (B, V)
    q_n = q_pad.gather(1, idx).squeeze(1)                                            # (B, V)
    residual = (p_n - q_n).clamp_min(0.0)                                           # (B, V)  max(0, p_n − q_n)
    empty = residual.sum(dim=-1, keepdim=True) <= 0                                 # (B, 1)  p_n ≤ q_n everywhere
    dist = torch.where(empty, p_n, residual)                  # (B, V)  unnormalised; multinomial normalises
    next_tokens = torch.multinomial(dist.to(rng_device), 1, generator=generator).squeeze(1).to(device)  # (B,)
    return num_accepted, next_tokens


def accept_draft(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """Speculative sampling for one sequence (Leviathan et al. 2023; Chen et al. 2023; formulas in
    the module docstring): accept x_i while u_i < min(1, p_i(x_i)/q_i(x_i)); after the first rejection
    at n draw the next token from norm(max(0, p_n − q_n)) (p_n if that is all zero), or from p_γ when
    all γ are accepted.

    target_probs (γ+1, V), draft_probs (γ, V), draft_tokens (γ,) -> (num_accepted, next_token).
    The sequence continues with draft_tokens[:num_accepted] then next_token. Draws the same random
    numbers as `accept_draft_batched` on a batch of one."""
    _check_shapes(target_probs, draft_probs, draft_tokens, batched=False)
    n, nxt = accept_draft_batched(target_probs.unsqueeze(0), draft_probs.unsqueeze(0),
                                  draft_tokens.unsqueeze(0), generator)
    return int(n[0]), int(nxt[0])


def accept_greedy_batched(target_logits_or_probs: torch.Tensor,
                          draft_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification for B sequences: scores (B, γ+1, V) (logits or probabilities: only the
    argmax is read), draft_tokens (B, γ) -> (num_accepted (B,), next_tokens (B,)).
    Accept x_i while argmax p_i = x_i; next = argmax p_n at the first mismatch n (or n = γ)."""
    _check_shapes(target_logits_or_probs, None, draft_tokens, batched=True)
    best = target_logits_or_probs.argmax(dim=-1)                                    # (B, γ+1)
    gamma = draft_tokens.shape[-1]
    match = best[:, :gamma] == draft_tokens.to(device=best.device, dtype=torch.long)  # (B, γ)
    num_accepted = match.long().cumprod(dim=-1).sum(dim=-1)                         # (B,)
    next_tokens = best.gather(1, num_accepted.unsqueeze(1)).squeeze(1)              # (B,)
    return num_accepted, next_tokens


def accept_greedy(target_logits_or_probs: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, int]:
    """Greedy verification for one sequence: scores (γ+1, V), draft_tokens (γ,) -> (num_accepted,
    next_token). Accept x_i while argmax p_i = x_i; next = argmax p_n at the first mismatch n (or at
    the bonus position n = γ). The emitted tokens are exactly target greedy decoding's."""
    _check_shapes(target_logits_or_probs, None, draft_tokens, batched=False)
    n, nxt = accept_greedy_batched(target_logits_or_probs.unsqueeze(0), draft_tokens.unsqueeze(0))
    return int(n[0]), int(nxt[0])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ngram_propose(tokens: Sequence[int], k: int, n_max: int = 3, n_min: int = 1) -> list[int]:
    """Prompt lookup decoding (Saxena 2023; vLLM's n-gram proposer): for n = n_max down to n_min,
    find the latest earlier occurrence tokens[j : j+n] (j < L − n) of the last n tokens and propose
    the up to k tokens that followed it, tokens[j+n : j+n+k]. [] when no n matches.

    `tokens` is the sequence so far (prompt + generated); a tensor is read with `.tolist()`."""
    if not _is_int(k) or k < 1:
        raise ValueError(f"k={k!r}: expected an integer >= 1")
    if not _is_int(n_min) or n_min < 1:
        raise ValueError(f"n_min={n_min!r}: expected an integer >= 1")
    if not _is_int(n_max) or n_max < n_min:
        raise ValueError(f"n_max={n_max!r}: expected an integer >= n_min={n_min!r}")
    seq = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    L = len(seq)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = seq[L - n:]
        last = suffix[-1]
        for j in range(L - n - 1, -1, -1):          # latest first; j + n ≤ L − 1 leaves a token after it
            if seq[j + n - 1] == last and seq[j:j + n] == suffix:
                return seq[j + n:j + n + k]
    return []
