"""d-RLAIF's score judge: the first in-range integer of the judge's answer, mapped to [-1, 1]; answers
with no score are counted and get the midpoint (or the chosen fallback)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmkit.align.score_judge import DEFAULT_TEMPLATE, ScoreJudge, parse_score
from llmkit.tokenizer import train_char

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :.,?!/()\n'-"


@pytest.mark.parametrize("text, expected", [(" 7", 7), ("Score: 10/10", 10), ("eleven", None), ("0", None),
                                            ("12", None), ("", None), (" 12, I mean 3", 3), ("7.5", 7),
                                            ("-3", None)])
def test_parse_score_takes_the_first_integer_in_range(text, expected):
    assert parse_score(text, 1, 10) == expected


def test_parse_score_follows_the_scale():
    assert parse_score("Score: 5", 1, 4) is None and parse_score("0", 0, 4) == 0


class ScriptedLM(nn.Module):
    """A stand-in judge for `generation.generate`: at the prefill it decodes each (left-padded) row's
    prompt and looks up the reply `replies` gives for the text after "Response: "; then it emits that
    reply one token per step, then EOS. The KV cache is ignored: a new cache object means a new call."""

    def __init__(self, tokenizer, replies: dict):
        super().__init__()
        self.tokenizer, self.replies = tokenizer, replies
        self.anchor = nn.Parameter(torch.zeros(1))          # `evaluating` reads the device from a parameter
        self.config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_id,
                                      is_encoder_decoder=False, positional="rope", vocab_size=tokenizer.vocab_size)
        self.prompts_seen: list[str] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=None):
        B, T = input_ids.shape
        if cache is not getattr(self, "_cache", None):      # the prefill of a new generate() call
            self._cache, self.step, self.plan = cache, 0, []
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            for row, keep in zip(input_ids.tolist(), mask.tolist()):
                text = self.tokenizer.decode([t for t, k in zip(row, keep) if k])
                self.prompts_seen.append(text)
                response = text.split("Response: ")[1].split("\n")[0]
                self.plan.append(self.tokenizer.encode(self.replies[response], add_special_tokens=False))
        logits = torch.zeros(B, T, self.config.vocab_size)                                  # (B, T, V)
        for b, plan in enumerate(self.plan):
            token = plan[self.step] if self.step < len(plan) else self.config.eos_token_id
            logits[b, -1, token] = 10.0
        self.step += 1
        return SimpleNamespace(logits=logits)


REPLIES = {"fine answer": " 7", "great answer": "Score: 10/10", "odd answer": "eleven", "zero answer": "0",
           "big answer": "12", "poor answer": " 1 out of 10"}


def judge_and_tokenizer(**options):
    tok = train_char(texts=[ALPHABET, DEFAULT_TEMPLATE], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    return ScoreJudge(ScriptedLM(tok, REPLIES), tok, max_new_tokens=16, **options), tok


def test_scores_are_normalised_to_minus_one_one_and_unparsed_answers_counted():
    judge, _ = judge_and_tokenizer(batch_size=4)
    responses = list(REPLIES)
    prompts = [f"question {i}?" + " pad" * i for i in range(len(responses))]     # unequal lengths: left padding
    rewards = judge(prompts, responses)
    assert rewards.dtype == torch.float32 and rewards.shape == (6,)
    # (s - 1) / 9 * 2 - 1: 7 -> 1/3, 10 -> 1, 1 -> -1; eleven, 0 and 12 have no score in [1, 10] -> 0.0
    assert torch.allclose(rewards, torch.tensor([1 / 3, 1.0, 0.0, 0.0, 0.0, -1.0]))
    assert judge.stats == {"scored": 3, "unparsed": 3}
    assert judge.last_answers == [REPLIES[r] for r in responses]
    assert judge.model.prompts_seen[0] == DEFAULT_TEMPLATE.format(prompt=prompts[0], response=responses[0],
                                                                  low=1, high=10)
    judge(prompts[:2], responses[:2])
    assert judge.stats == {"scored": 5, "unparsed": 3}                             # counts accumulate over calls


def test_unparsed_reward_and_scale_are_settable():
    judge, _ = judge_and_tokenizer(unparsed=-1.0, low=0, high=20)
    rewards = judge(["q?"] * 3, ["fine answer", "zero answer", "odd answer"])
    assert torch.allclose(rewards, torch.tensor([7 / 20 * 2 - 1, -1.0, -1.0]))
    assert judge.stats == {"scored": 2, "unparsed": 1}


def test_bad_settings_name_the_argument():
    tok = train_char(texts=[ALPHABET])
    with pytest.raises(ValueError, match=r"unparsed=2.0: expected a reward in \[-1, 1\]"):
        ScoreJudge(None, tok, unparsed=2.0)
    with pytest.raises(ValueError, match="low=5, high=5"):
        ScoreJudge(None, tok, low=5, high=5)
    with pytest.raises(ValueError, match=r"no \{response\} field"):
        ScoreJudge(None, tok, template="Rate {prompt}")
    judge, _ = judge_and_tokenizer()
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        judge(["a", "b"], ["fine answer"])
