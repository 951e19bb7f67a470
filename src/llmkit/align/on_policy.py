"""On-policy preference pairs: the model's own wrong answers as the rejected side.

With a fixed, synthetic wrong answer as the rejected side, DPO-style training learns to rank two
answers of which the model may never produce the second: margins and preference accuracy grow,
but the model's greedy answers hardly move. Self-generated negatives fix that (Xu et al., 2023,
"Some things are more CRINGE than others: Iterative preference optimization with the pairwise
cringe loss"; Pang et al., 2024, "Iterative Reasoning Preference Optimization"): for a prompt x
with a known answer y*, let the model answer; an answer ŷ that is wrong gives the pair

    (x, chosen = y*, rejected = ŷ),     ŷ = the greedy answer, or one of `samples` draws at
                                        `temperature` when the greedy answer is right

so the loss pushes down exactly the answers the model gives. Prompts the model answers right in
every try give no pair (there is nothing to correct). An empty answer (the model stops at once)
cannot be scored as a completion and is counted, not used.

Correct means exact match after `data.synthetic.exact_match`'s normalisation (first line,
stripped). Prompts are tokenised as `tokenize_rows` does (prefix_ids + encode(prompt)), so the
pairs are sampled from exactly the distribution the objective later scores.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..data.synthetic import exact_match
from ..generation import generate
from ..model.modes import evaluating
from .rollout import left_pad, stop_token_ids


@torch.no_grad()
def complete(model, tokenizer, prompts: Sequence[str], *, prefix_ids: Sequence[int] = (), max_new_tokens: int = 16,
             batch_size: int = 64, do_sample: bool = False, temperature: float = 1.0,
             generator: Optional[torch.Generator] = None) -> list[str]:
    """The model's answer to each prompt (greedy, or sampled), cut at the first stop (special) token.

    Prompts go in left-padded batches; each is prefix_ids + encode(prompt)."""
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_id
    answers = []
    with evaluating(model) as device:
        for start in range(0, len(prompts), batch_size):
            ids = [list(prefix_ids) + tokenizer.encode(p, add_special_tokens=False)
                   for p in prompts[start:start + batch_size]]
            batch, mask = left_pad(ids, pad, device)                                         # (B, T) each
            width = batch.shape[1]
            out = generate(model, batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, stop_token_ids=stops, generator=generator)     # (B, T + n)
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                answers.append(tokenizer.decode(row[:cut]))
    return answers


def is_correct(answer: str, reference: str) -> bool:
    return exact_match([answer], [reference]) == 1.0


def on_policy_pairs(model, tokenizer, rows: Sequence[dict], *, prefix_ids: Sequence[int] = (),
                    max_new_tokens: int = 16, samples: int = 0, temperature: float = 1.0, batch_size: int = 64,
                    seed: int = 0) -> tuple[list[dict], dict]:
    """Rows {"prompt", "answer"} -> ({"prompt", "chosen": answer, "rejected": the model's wrong answer}
    pairs, stats). See the module docstring. Stats: prompts, greedy_correct (the fraction answered right
    greedily: the policy's train exact match), pairs, from_greedy, from_samples, empty (wrong answers
    that were empty and so dropped), no_negative (prompts with no usable wrong answer)."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
            raise ValueError(f"on_policy_pairs: row {i} = {str(row)[:80]!r}: expected {{'prompt': str, 'answer': str}}")
    if samples < 0:
        raise ValueError(f"samples={samples!r}: expected an int >= 0")
    prompts = [r["prompt"] for r in rows]
    args = dict(prefix_ids=prefix_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rejected: list[Optional[str]] = [None] * len(rows)
    greedy = complete(model, tokenizer, prompts, **args)
    stats = {"prompts": len(rows), "greedy_correct": 0, "from_greedy": 0, "from_samples": 0, "empty": 0}

    def offer(i: int, answer: str, source: str) -> None:
        if rejected[i] is not None or is_correct(answer, rows[i]["answer"]):
            return
        if not answer.strip():
            stats["empty"] += 1
            return
        rejected[i] = answer
        stats[source] += 1

    for i, answer in enumerate(greedy):
        stats["greedy_correct"] += is_correct(answer, rows[i]["answer"])
        offer(i, answer, "from_greedy")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for _ in range(samples):
        todo = [i for i in range(len(rows)) if rejected[i] is None]
        if not todo:
            break
        drawn = complete(model, tokenizer, [prompts[i] for i in todo], do_sample=True, temperature=temperature,
                         generator=generator, **args)
        for i, answer in zip(todo, drawn):
            offer(i, answer, "from_samples")
    pairs = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": rejected[i]}
             for i, r in enumerate(rows) if rejected[i] is not None]
    stats.update(greedy_correct=stats["greedy_correct"] / max(len(rows), 1), pairs=len(pairs),
                 no_negative=len(rows) - len(pairs))
    return pairs, stats
