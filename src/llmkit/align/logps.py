"""Log-probabilities of completions under a causal LM: the one quantity every alignment loss uses.

For a sequence x = (prompt, completion) and a causal LM π,

    log π(y | x) = Σ_{t ∈ completion} log softmax(logits_{t-1})[x_t]        (reduce="sum")
    mean form    = log π(y | x) / |y|                                        (reduce="mean")

`logits[:, t]` predicts token t+1 (the model's own alignment), `labels` are the input ids and
`mask` marks the scored (completion) tokens with 1, aligned with `labels`. Everything is computed
in fp32 and only at the masked positions, so prompt and padding positions cost nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for flat rows: (N, V), (N,) -> (N,), in fp32.

    logsumexp + gather instead of a full log_softmax: no second (N, V) tensor is kept."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                  # (N,)
    return picked - torch.logsumexp(logits, dim=-1)                                # (N,)


def reduce_per_sequence(per_token: torch.Tensor, rows: torch.Tensor, n_rows: int, reduce: str = "sum"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or mean) flat per-token values (N,) into their sequences `rows` (N,): -> (B,), counts (B,)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}: expected one of {list(REDUCTIONS)}")
    totals = per_token.new_zeros(n_rows).index_add(0, rows, per_token)            # (B,)
    counts = torch.bincount(rows, minlength=n_rows).to(per_token.dtype)             # (B,)
    if reduce == "mean":
        totals = totals / counts.clamp(min=1)
    return totals, counts


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, reduce: str = "sum",
                   *, return_counts: bool = False):
    """Per-sequence log π(completion | prompt): logits (B, T, V), labels (B, T), mask (B, T) -> (B,).

    mask[:, 0] is ignored (the first token has no prediction). A row whose mask is all zero has
    log-prob 0 with reduce="sum" and 0 with reduce="mean" (count clamped to 1); `return_counts`
    also returns the number of scored tokens per row (B,)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(f"sequence_logps: expected logits (B, T, V) with labels and mask (B, T); got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}")
    scored = mask[:, 1:].bool()                                                    # (B, T-1)
    return _scored_logps(logits[:, :-1][scored], labels, scored, reduce, return_counts)


def causal_lm_logps(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    loss_mask: torch.Tensor, reduce: str = "sum", *, return_counts: bool = False):
    """sequence_logps of `model` on a batch, with one forward.

    The model's LM head runs only on the positions that predict a completion token (its
    `logits_index=` option, which a DDP or compile wrapper passes through): the (B, T, V) logits of
    prompt and padding positions are never built. Same numbers as `sequence_logps(model(...).logits,
    ...)`, a fraction of the head's time and memory."""
    scored = loss_mask[:, 1:].bool()                                               # (B, T-1)
    predicting = F.pad(scored, (0, 1))                                             # (B, T): t predicts t+1
    logits = model(input_ids, attention_mask=attention_mask, logits_index=predicting).logits   # (N, V)
    return _scored_logps(logits, input_ids, scored, reduce, return_counts)


def _scored_logps(logits: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor, reduce: str, return_counts: bool):
    """logits (N, V) of the `scored` (B, T-1) positions -> per-sequence totals (B,) (+ counts)."""
    per_token = token_logps(logits, labels[:, 1:][scored])                         # (N,)
    totals, counts = reduce_per_sequence(per_token, scored.nonzero(as_tuple=True)[0], labels.shape[0], reduce)
    return (totals, counts) if return_counts else totals


def mean_token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over scored positions of KL(π(·|x_<t) ‖ π_ref(·|x_<t)) = Σ_v π(v)(log π(v) − log π_ref(v)).

    logits (B, T, V) from both models on the same inputs, mask (B, T) aligned with the labels as in
    sequence_logps. The exact next-token KL (no sampling), averaged over the completion tokens."""
    scored = mask[:, 1:].bool()                                                    # (B, T-1)
    logp = policy_logits[:, :-1][scored].float().log_softmax(-1)                   # (N, V)
    logq = reference_logits[:, :-1][scored].float().log_softmax(-1)                # (N, V)
    if logp.shape[0] == 0:
        return logp.new_zeros(())
    return (logp.exp() * (logp - logq)).sum(-1).mean()
