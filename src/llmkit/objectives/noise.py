"""Noise functions for denoising autoencoders (BART, Lewis et al. 2020, "BART: Denoising
Sequence-to-Sequence Pre-training for Natural Language Generation, Translation, and
Comprehension", §2.2; the idea goes back to Vincent et al. 2008, "Extracting and Composing Robust
Features with Denoising Autoencoders").

Each function corrupts ONE document x = (x_1 … x_n), a 1-D tensor (or list) of token ids, and
returns the corrupted x̃ as a new 1-D int64 tensor; the input is never modified. All randomness
comes from the `torch.Generator` passed in, so the same generator state gives the same x̃.

| name                   | x̃                                                                      |
|------------------------|-------------------------------------------------------------------------|
| token_masking          | round(r·n) positions, drawn without replacement, become <mask>          |
| token_deletion         | round(r·n) positions, drawn without replacement, are removed            |
| span_infilling         | spans, lengths ~ Poisson(λ), covering round(r·n) tokens; each span —    |
|                        | a length-0 span too (an inserted <mask>) — becomes ONE <mask>           |
| sentence_permutation   | sentences (each ends at a sentence-end token) shuffled                  |
| document_rotation      | rotated to start at a uniformly drawn token: x_k … x_n x_1 … x_{k-1}    |

`apply_noise` composes several in the fixed order NOISE_ORDER (reorder first, then remove/mask, as
fairseq's BART denoising dataset does: reordering after masking would move <mask> tokens around
and sentence ends could already be masked away).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

NOISE_ORDER = ("sentence_permutation", "document_rotation", "token_deletion", "token_masking", "span_infilling")


def _as_ids(tokens) -> torch.Tensor:
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


def _check_ratio(ratio: float) -> float:
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"mask_ratio={ratio!r}: expected a fraction in [0, 1]")
    return float(ratio)


def _choose(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct positions of range(n), uniformly, as a (n,) bool mask."""
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=generator)[:k]] = True
    return chosen


def token_masking(tokens, mask_id: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Replace exactly round(ratio · n) tokens, chosen uniformly without replacement, by `mask_id`
    (BART's token masking, as in BERT but without the 10 % random / 10 % kept split). Length kept."""
    ids = _as_ids(tokens)                                                          # (n,)
    chosen = _choose(len(ids), round(_check_ratio(ratio) * len(ids)), generator)   # (n,)
    return ids.masked_fill(chosen, mask_id)


def token_deletion(tokens, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Delete exactly round(ratio · n) tokens chosen uniformly without replacement; the model must
    also find WHERE input is missing. Output length n − round(ratio · n)."""
    ids = _as_ids(tokens)                                                          # (n,)
    deleted = _choose(len(ids), round(_check_ratio(ratio) * len(ids)), generator)  # (n,)
    return ids[~deleted]


def poisson_span_lengths(num_to_mask: int, generator: torch.Generator, poisson_lambda: float = 3.0) -> list[int]:
    """Span lengths ℓ_i ~ Poisson(λ) drawn until Σ ℓ_i ≥ num_to_mask; the last one is trimmed so that
    Σ ℓ_i == num_to_mask exactly (fairseq's "trim to masking budget"). Zero lengths are kept: each
    is a span that covers nothing and becomes an inserted <mask> (BART §2.2, text infilling)."""
    if poisson_lambda <= 0:
        raise ValueError(f"poisson_lambda={poisson_lambda!r}: expected a positive rate")
    lengths, total = [], 0
    while total < num_to_mask:
        chunk = max(8, math.ceil((num_to_mask - total) / poisson_lambda) + 4)
        for length in torch.poisson(torch.full((chunk,), float(poisson_lambda)), generator=generator).long().tolist():
            lengths.append(length)
            total += length
            if total >= num_to_mask:
                break
    if lengths:
        lengths[-1] -= total - num_to_mask
    return lengths


def plan_spans(n: int, ratio: float, generator: torch.Generator, poisson_lambda: float = 3.0) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) spans over range(n), sorted by start, lengths from
    `poisson_span_lengths(round(ratio · n))`. The k spans and the n − m untouched tokens (m = Σ ℓ)
    are laid out in a uniformly random interleaving (k slots drawn among n − m + k), so every gap
    between kept tokens is equally likely to hold a span."""
    m = round(_check_ratio(ratio) * n)
    lengths = poisson_span_lengths(m, generator, poisson_lambda)
    k = len(lengths)
    slots = torch.randperm(n - m + k, generator=generator)[:k].sort().values.tolist()
    spans, consumed = [], 0
    for i, (slot, length) in enumerate(zip(slots, lengths)):
        start = slot - i + consumed            # kept tokens before this slot + tokens in earlier spans
        spans.append((start, length))
        consumed += length
    return spans


def span_infilling(tokens, mask_id: int, ratio: float, generator: torch.Generator,
                   poisson_lambda: float = 3.0) -> torch.Tensor:
    """BART text infilling: spans with Poisson(λ = 3) lengths covering round(ratio · n) tokens are
    each replaced by ONE `mask_id` (a length-0 span inserts a <mask>), so the model also learns how
    many tokens a <mask> stands for. Output length n − m + k for k spans covering m tokens."""
    ids = _as_ids(tokens)                                                          # (n,)
    pieces, cursor = [], 0
    mask = ids.new_tensor([mask_id])                                               # (1,)
    for start, length in plan_spans(len(ids), ratio, generator, poisson_lambda):
        pieces += [ids[cursor:start], mask]
        cursor = start + length
    pieces.append(ids[cursor:])
    return torch.cat(pieces)


def split_sentences(tokens, sentence_end_ids: Iterable[int]) -> list[torch.Tensor]:
    """Consecutive pieces of `tokens`, each ending just after a sentence-end token (the last piece
    may end without one). Concatenated they give `tokens` back."""
    ids = _as_ids(tokens)                                                          # (n,)
    ends = torch.isin(ids, torch.as_tensor(sorted(set(sentence_end_ids)), dtype=torch.long))
    cuts = (torch.nonzero(ends).flatten() + 1).tolist()
    bounds = [0] + [c for c in cuts if c < len(ids)] + [len(ids)]
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def sentence_permutation(tokens, sentence_end_ids: Iterable[int], generator: torch.Generator) -> torch.Tensor:
    """Split into sentences at `sentence_end_ids` (full stops, ?, !, EOS …) and shuffle them with a
    uniform random permutation (BART's sentence permutation)."""
    sentences = split_sentences(tokens, sentence_end_ids)
    if len(sentences) < 2:
        return _as_ids(tokens).clone()
    order = torch.randperm(len(sentences), generator=generator).tolist()
    return torch.cat([sentences[i] for i in order])


def document_rotation(tokens, generator: torch.Generator) -> torch.Tensor:
    """Rotate so the document starts at a uniformly drawn token x_k: x_k … x_n x_1 … x_{k-1}
    (BART's document rotation; the model must find the true start)."""
    ids = _as_ids(tokens)                                                          # (n,)
    if len(ids) == 0:
        return ids.clone()
    k = int(torch.randint(len(ids), (1,), generator=generator))
    return torch.roll(ids, -k)


def check_noise(noise: Sequence[str] | str) -> tuple[str, ...]:
    """The noise list as a tuple, every name checked against NOISE_ORDER."""
    names = (noise,) if isinstance(noise, str) else tuple(noise)
    for name in names:
        if name not in NOISE_ORDER:
            raise ValueError(f"noise={name!r}: expected one of {list(NOISE_ORDER)}")
    if not names:
        raise ValueError("noise=[]: expected at least one noise function")
    return names


def apply_noise(tokens, noise: Sequence[str], generator: torch.Generator, *, mask_id: int | None = None,
                mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                sentence_end_ids: Iterable[int] = ()) -> torch.Tensor:
    """Compose the named noise functions (in NOISE_ORDER, whatever order `noise` lists them); the
    masking ones all use `mask_ratio`. BART's best setting: ["sentence_permutation", "span_infilling"]
    with mask_ratio 0.3 (Lewis et al. 2020, §5)."""
    names = check_noise(noise)
    if mask_id is None and {"token_masking", "span_infilling"} & set(names):
        raise ValueError(f"noise={list(names)} needs a mask token: expected mask_id (the tokenizer's "
                         "'mask' role, e.g. '<mask>')")
    steps = {"sentence_permutation": lambda x: sentence_permutation(x, sentence_end_ids, generator),
             "document_rotation": lambda x: document_rotation(x, generator),
             "token_deletion": lambda x: token_deletion(x, mask_ratio, generator),
             "token_masking": lambda x: token_masking(x, mask_id, mask_ratio, generator),
             "span_infilling": lambda x: span_infilling(x, mask_id, mask_ratio, generator, poisson_lambda)}
    x = _as_ids(tokens)
    for name in NOISE_ORDER:
        if name in names:
            x = steps[name](x)
    return x
