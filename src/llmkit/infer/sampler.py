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


def warped_probs_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
    """`warped_probs` for S rows at once, each with its own values: logits (S, V), temperature,
    top_k (V = no limit) and top_p (S,) -> probabilities (S, V), through generation's per-row
    apply_top_k / apply_top_p (the same rules as for one row)."""
    z = logits.float() / temperature[:, None]                                                 # (S, V)
    return apply_top_p(apply_top_k(z, top_k), top_p).softmax(-1)


def warp_for(logits: torch.Tensor, params: Seq) -> torch.Tensor:
    """`warped_probs_rows` with row r warped by params[r] (SamplingParams): (S, V) -> (S, V)."""
    V, dev = logits.shape[-1], logits.device
    return warped_probs_rows(logits, torch.tensor([p.temperature for p in params], device=dev),
                             torch.tensor([p.top_k or V for p in params], device=dev),
                             torch.tensor([p.top_p for p in params], device=dev))


def draw(probs: torch.Tensor, generators: Seq[torch.Generator]) -> list[int]:
    """One token per row of probs (S, V), by inverse CDF on one uniform from each row's generator."""
    u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], device=probs.device)
    cdf = probs.cumsum(-1)                                                                     # (S, V)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    return picked.clamp(max=probs.shape[-1] - 1).tolist()


def sample(logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int], list[Optional[dict]]]:
    """logits (R, V), one row per sequence in `seqs` -> (next token per row, logprob entry or None).

    Sampled rows are warped together (`warped_probs_rows`) and drawn by inverse CDF with one
    uniform from each sequence's own generator, so a seeded sequence draws the same token whatever
    shares the batch; the penalties run per row (they read each row's history)."""
    logits = logits.float()
    R, V = logits.shape
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None             # (R, V)
    tokens = logits.argmax(dim=-1).tolist()                                            # greedy (R,)
    penalised = [r for r, s in enumerate(seqs) if s.params.penalised]
    if penalised:
        logits = logits.clone()
        for r in penalised:
            seq, p = seqs[r], seqs[r].params
            row = logits[r]                                                            # (V,)
            if p.repetition_penalty != 1.0:
                ids = torch.tensor([seq.tokens], device=row.device)
                row = apply_repetition_penalty(row[None], ids, p.repetition_penalty)[0]
            row = apply_presence_frequency(row, seq.output, p.presence_penalty, p.frequency_penalty)
            if p.allowed_tokens is not None:                                           # constrained decoding
                row = row.masked_fill(~p.allowed_tokens(seq.output).to(row.device), float("-inf"))
            logits[r] = row
            if p.greedy:
                tokens[r] = int(logits[r].argmax())
    drawn = [r for r, s in enumerate(seqs) if not s.params.greedy]
    if drawn:
        probs = warp_for(logits[drawn], [seqs[r].params for r in drawn])              # (S, V)
        for r, token in zip(drawn, draw(probs, [seqs[r].generator for r in drawn])):
            tokens[r] = token
    entries = [top_logprobs(raw[r], tokens[r], seqs[r].params.logprobs) if want_logprobs[r] else None
               for r in range(R)]
    return tokens, entries
