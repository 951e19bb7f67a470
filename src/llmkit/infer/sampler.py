"""Next tokens for a step's sampled sequences: penalties, temperature, top-k, top-p, then an argmax
or a draw from each sequence's own generator (formulas in params.py).

Everything that is the same for the whole batch runs on the (R, V) logits at once (the raw
log-softmax for logprobs, the argmax of greedy rows, temperature); top-k / top-p, the penalties and
the draw run per row, since each row has its own values and its own generator.
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

from ..generation import apply_repetition_penalty, apply_top_k, apply_top_p
from .scheduler import Sequence


def apply_presence_frequency(logits: torch.Tensor, output: Seq[int], presence: float, frequency: float
                             ) -> torch.Tensor:
    """OpenAI's penalties on (V,) logits: z_v − presence · [c_v > 0] − frequency · c_v, with c_v the
    count of v in the output so far."""
    if not output or not (presence or frequency):
        return logits
    counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)                             # (V,)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def warped_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(top_p(top_k(z / T))) over (..., V)
    logits (what speculative verification must compare, for the draft and the target alike)."""
    flat = logits.float().reshape(-1, logits.shape[-1]) / params.temperature                  # (M, V)
    return apply_top_p(apply_top_k(flat, params.top_k), params.top_p).softmax(-1).view(logits.shape)


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict:
    """{"token", "logprob", "top": [(id, logprob), ...k]} from a (V,) raw log-softmax row."""
    entry = {"token": token, "logprob": float(logprobs[token]), "top": []}
    if k:
        values, ids = torch.topk(logprobs, k)
        entry["top"] = [(int(i), float(v)) for i, v in zip(ids, values)]
    return entry


def sample(logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int], list[Optional[dict]]]:
    """logits (R, V), one row per sequence in `seqs` -> (next token per row, logprob entry or None)."""
    logits = logits.float()
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None             # (R, V)
    greedy = logits.argmax(dim=-1).tolist()                                            # (R,)
    tokens, entries = [], []
    for r, seq in enumerate(seqs):
        p = seq.params
        if p.greedy and not p.penalised:
            token = greedy[r]
        else:
            row = logits[r]                                                            # (V,)
            if p.repetition_penalty != 1.0:
                ids = torch.tensor([seq.tokens], device=row.device)
                row = apply_repetition_penalty(row[None], ids, p.repetition_penalty)[0]
            row = apply_presence_frequency(row, seq.output, p.presence_penalty, p.frequency_penalty)
            if p.greedy:
                token = int(row.argmax())
            else:
                token = int(torch.multinomial(warped_probs(row, p), 1, generator=seq.generator))
        tokens.append(token)
        entries.append(top_logprobs(raw[r], token, p.logprobs) if want_logprobs[r] else None)
    return tokens, entries
