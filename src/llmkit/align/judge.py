"""An AI judge for RLAIF (Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning from Human
Feedback with AI Feedback"): a language model asked which of two responses is better, read from its
log-probs of the two answer labels at the position after the preference prompt,

    P(A ≻ B | order) = softmax(log p("A"), log p("B"))[0],

and, because judges favour a position, averaged over both orders:

    P(a ≻ b) = ½ (P(A = a ≻ B = b) + 1 − P(A = b ≻ B = a)).

With `rationale=True` the judge first writes a chain of thought (greedy, `max_new_tokens`), which is
placed before the answer prompt. `label_pairs` turns judgements into preference rows
{prompt, chosen, rejected, label}, label = P(chosen ≻ rejected) ≥ ½: the rows every preference
loss takes, with the soft label for a cross-entropy reward model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

DEFAULT_TEMPLATE = ("Which response answers the prompt better: more helpful, honest and harmless?\n"
                    "Prompt: {prompt}\nResponse A: {a}\nResponse B: {b}\n{rationale}Preferred response:")


class Judge:
    def __init__(self, model, tokenizer, *, template: str = DEFAULT_TEMPLATE, labels: Sequence[str] = (" A", " B"),
                 rationale: bool = False, max_new_tokens: int = 64):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.label_ids = []
        for label in labels:
            ids = tokenizer.encode(label, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"labels: {label!r} is {len(ids)} tokens for this tokenizer; expected one token "
                                 "each (e.g. ' A' / ' B' for BPE, 'A' / 'B' for a character tokenizer)")
            self.label_ids.append(ids[0])
        self.rationale, self.max_new_tokens = rationale, max_new_tokens

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)])             # (1, T)

    @torch.no_grad()
    def one_order(self, prompt: str, a: str, b: str) -> float:
        """P(A ≻ B) with `a` shown first."""
        rationale = ""
        if self.rationale:
            from ..generation import generate
            ask = self.template.format(prompt=prompt, a=a, b=b, rationale="Reasoning:").rsplit("\n", 1)[0]
            ids = self._ids(ask + "\nReasoning:")
            out = generate(self.model, ids, max_new_tokens=self.max_new_tokens)[0, ids.shape[1]:]
            rationale = "Reasoning:" + self.tokenizer.decode(out.tolist()) + "\n"
        ids = self._ids(self.template.format(prompt=prompt, a=a, b=b, rationale=rationale))
        logits = self.model(ids).logits[0, -1].float()                                            # (V,)
        pair = logits[self.label_ids].log_softmax(-1)                                              # (2,)
        return float(pair[0].exp())

    def prefer(self, prompt: str, a: str, b: str, both_orders: bool = True) -> float:
        """P(a ≻ b), averaged over both orders unless both_orders=False."""
        first = self.one_order(prompt, a, b)
        if not both_orders:
            return first
        return 0.5 * (first + 1.0 - self.one_order(prompt, b, a))

    def label_pairs(self, rows: Sequence[dict], both_orders: bool = True) -> list[dict]:
        """rows {prompt, a, b} -> preference rows {prompt, chosen, rejected, label}."""
        out = []
        for row in rows:
            p = self.prefer(row["prompt"], row["a"], row["b"], both_orders)
            chosen, rejected = (row["a"], row["b"]) if p >= 0.5 else (row["b"], row["a"])
            out.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "label": max(p, 1 - p)})
        return out


def agreement(labelled: Sequence[dict], truth: Optional[Sequence[str]] = None) -> float:
    """Fraction of rows whose chosen response equals the true better one (`truth`, per row)."""
    hits = sum(row["chosen"] == best for row, best in zip(labelled, truth))
    return hits / max(len(labelled), 1)
