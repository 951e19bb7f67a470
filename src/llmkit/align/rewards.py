"""What PPO is rewarded by: a reward model on the policy's tokens, or any function of the text.

    reward(rollout, prompts, completions) -> scores (B,)

`as_reward(obj, ...)` makes that one callable from
- a reward model (`ValueModel`, e.g. trained by `llmkit align method=rm`): it scores query +
  response as one sequence; its score is the head's value at the *last real token* of each row
  (the stop token, or the last sampled token), never at padding: ValueModel reads the row's last
  1 in the attention mask, and the mask is left-padded before the prompt and 0 after the stop;
- a text function `f(prompts, completions) -> floats or a (B,) tensor`: a known true reward, or
  an AI judge's 1–10 score used directly (d-RLAIF, Lee et al. 2023; `ScoreJudge`).
A reward model reads the policy's token ids, so it must share the policy's tokenizer; a different
one is an error (`check_same_tokenizer`), not a silent mis-scoring.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..model.modes import evaluating


def _vocab(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend", tokenizer)
    return backend.get_vocab(with_added_tokens=True) if hasattr(backend, "get_vocab") else {}


def check_same_tokenizer(policy_tokenizer, reward_tokenizer, what: str = "reward model") -> None:
    """Raise ValueError when the two tokenizers map any token to a different id."""
    if policy_tokenizer is None or reward_tokenizer is None or policy_tokenizer is reward_tokenizer:
        return
    a, b = _vocab(policy_tokenizer), _vocab(reward_tokenizer)
    if a == b:
        return
    differing = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(f"the {what}'s tokenizer differs from the policy's (vocab sizes {len(b)} vs {len(a)}; "
                     f"e.g. {differing}): it would score the policy's token ids as other tokens. Expected a "
                     f"{what} trained with the policy's tokenizer (or a text reward that re-tokenizes)")


class ModelReward:
    """Scores from a scalar-head model (B,) at each row's last real token."""

    def __init__(self, model: nn.Module):
        if not hasattr(model, "value_head"):
            raise TypeError(f"reward model {type(model).__name__}: expected a scalar-head model (ValueModel, as "
                            "`llmkit align method=rm` saves) or a text reward function")
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, rollout, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        inputs = rollout.inputs()
        device = next(self.model.parameters()).device
        with evaluating(self.model):
            out = self.model(inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                             position_ids=inputs["position_ids"].to(device))
        return out.logits.float().to(rollout.query.device)                                     # (B,)


class TextReward:
    """Scores from `fn(prompts, completions)` (floats or a (B,) tensor)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, rollout, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        scores = self.fn(list(prompts), list(completions))
        scores = torch.as_tensor(scores, dtype=torch.float32, device=rollout.query.device).reshape(-1)
        if scores.shape[0] != len(completions):
            raise ValueError(f"reward function {getattr(self.fn, '__name__', self.fn)!r} returned {scores.shape[0]} "
                             f"scores for {len(completions)} completions: expected one float per completion")
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward function returned non-finite scores {scores.tolist()[:8]}: expected floats")
        return scores

    def stats(self) -> dict:
        """The function's own counters, if it keeps any (a judge's scored / unparsed answers)."""
        return dict(getattr(self.fn, "stats", None) or {})


def as_reward(obj, *, policy_tokenizer=None, reward_tokenizer=None):
    """A reward model (nn.Module with a value head) or a text function -> reward(rollout, prompts, completions)."""
    if isinstance(obj, (ModelReward, TextReward)):
        return obj
    if isinstance(obj, nn.Module):
        check_same_tokenizer(policy_tokenizer, reward_tokenizer)
        return ModelReward(obj)
    if callable(obj):
        return TextReward(obj)
    raise TypeError(f"reward={type(obj).__name__}: expected a reward model (ValueModel) or a function "
                    "(prompts, completions) -> scores")


def missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """scores − penalty where a completion ran out of tokens without a stop token."""
    if not penalty:
        return scores
    return scores - penalty * (~has_eos).to(scores.dtype)
