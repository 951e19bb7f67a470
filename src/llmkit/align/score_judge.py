"""A score judge for direct RLAIF (d-RLAIF; Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning
from Human Feedback with AI Feedback", section 2.3): instead of training a reward model on AI
preferences, the policy is rewarded during RL by an LLM that rates each response from `low` to
`high` (1 to 10), the score mapped to [-1, 1]:

    r = (s − low) / (high − low) · 2 − 1,      s = the first integer in [low, high] the judge writes

The judge is asked with `template` (fields {prompt}, {response}, {low}, {high}) and answers greedily
(batched, through `on_policy.complete`). The paper weighs every score token by the judge's
probability of it; reading the generated answer instead works with any judge (one that writes
"Score: 7/10" as well as one that writes " 7") at the cost of a coarser signal.

An answer with no integer in range is counted in `stats["unparsed"]` (answers that gave a score:
`stats["scored"]`; both accumulate over calls) and gets the reward `unparsed`, in normalised units:
None means 0.0, the midpoint of the scale, so an unreadable verdict neither rewards nor punishes.

`ScoreJudge(...)(prompts, completions) -> (B,) float32` is the text-reward signature PPO calls
(`align.rewards.as_reward`).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

DEFAULT_TEMPLATE = ("Rate how helpful, honest and harmless the response to the prompt is, on a scale from {low} "
                    "(worst) to {high} (best).\nPrompt: {prompt}\nResponse: {response}\nScore:")

_INTEGER = re.compile(r"-?\d+")      # maximal digit runs, so "12" is twelve (out of range), never "1"


def parse_score(text: str, low: int = 1, high: int = 10) -> Optional[int]:
    """The first integer in `text` that lies in [low, high], or None ("7.5" reads as 7, "eleven" as None)."""
    for match in _INTEGER.finditer(text):
        value = int(match.group())
        if low <= value <= high:
            return value
    return None


class ScoreJudge:
    """d-RLAIF reward: `judge(prompts, completions) -> (B,)` scores in [-1, 1] (see the module docstring)."""

    def __init__(self, model, tokenizer, *, template: str = DEFAULT_TEMPLATE, max_new_tokens: int = 8,
                 low: int = 1, high: int = 10, unparsed: Optional[float] = None, batch_size: int = 32,
                 prefix_ids: Sequence[int] = ()):
        if not (isinstance(low, int) and isinstance(high, int) and low < high):
            raise ValueError(f"low={low!r}, high={high!r}: expected integers with low < high")
        for field in ("{prompt}", "{response}"):
            if field not in template:
                raise ValueError(f"template: no {field} field in {template[:60]!r}...: expected one "
                                 "(fields: {prompt}, {response}, {low}, {high})")
        self.unparsed = 0.0 if unparsed is None else float(unparsed)
        if not -1.0 <= self.unparsed <= 1.0:
            raise ValueError(f"unparsed={unparsed!r}: expected a reward in [-1, 1] (normalised units) or None (0.0)")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.low, self.high = max_new_tokens, low, high
        self.batch_size, self.prefix_ids = batch_size, list(prefix_ids)
        self.stats = {"scored": 0, "unparsed": 0}
        self.last_answers: list[str] = []          # the judge's raw answers of the last call, for inspection

    def ask(self, prompt: str, response: str) -> str:
        return self.template.format(prompt=prompt, response=response, low=self.low, high=self.high)

    def normalise(self, score: int) -> float:
        return (score - self.low) / (self.high - self.low) * 2.0 - 1.0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        from .on_policy import complete     # pulls in generation: imported on use
        if len(prompts) != len(completions):
            raise ValueError(f"ScoreJudge: {len(prompts)} prompts and {len(completions)} completions: expected "
                             "one completion per prompt")
        asks = [self.ask(p, c) for p, c in zip(prompts, completions)]
        answers = complete(self.model, self.tokenizer, asks, prefix_ids=self.prefix_ids,
                           max_new_tokens=self.max_new_tokens, batch_size=self.batch_size) if asks else []
        self.last_answers = answers
        rewards = []
        for answer in answers:
            score = parse_score(answer, self.low, self.high)
            self.stats["scored" if score is not None else "unparsed"] += 1
            rewards.append(self.unparsed if score is None else self.normalise(score))
        return torch.tensor(rewards, dtype=torch.float32)                                  # (B,)
