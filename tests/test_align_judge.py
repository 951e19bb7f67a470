"""The RLAIF judge (issue 15, part): P(A ≻ B) from the two label tokens' log-probs, and both-order
averaging against a judge with a planted position bias - measured agreement with the truth rises."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmkit.align.judge import Judge, agreement
from llmkit.tokenizer import train_char

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :.,?!\n'-"


class BiasedJudgeModel(nn.Module):
    """A stand-in judge LM with a known ground truth: it reads the two responses back from the ids,
    scores each by its count of the word 'good', and puts logit d + bias on 'A' (0 on 'B'), where
    d = 1.5 (q_A − q_B) + noise and `bias` favours whatever is shown first."""

    def __init__(self, tokenizer, bias: float, seed: int = 0):
        super().__init__()
        self.tokenizer, self.bias = tokenizer, bias
        self.rng = random.Random(seed)
        self.a_id, self.b_id = (tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B"))

    def forward(self, ids):
        text = self.tokenizer.decode(ids[0].tolist())
        a = text.split("Response A:")[1].split("\n")[0]
        b = text.split("Response B:")[1].split("\n")[0]
        d = 1.5 * (a.count("good") - b.count("good")) + self.rng.gauss(0, 0.5)
        logits = torch.zeros(1, ids.shape[1], self.tokenizer.vocab_size)
        logits[0, -1, self.a_id] = d + self.bias
        return SimpleNamespace(logits=logits)


def tokenizer():
    return train_char(texts=[ALPHABET])


def pairs(n=200, seed=1):
    rng = random.Random(seed)
    rows, truth = [], []
    for i in range(n):
        better = "a good good answer" if rng.random() < 0.5 else "a good answer"
        worse = "a bad answer"
        a, b = (better, worse) if rng.random() < 0.5 else (worse, better)
        rows.append({"prompt": f"question {i}?", "a": a, "b": b})
        truth.append(better)
    return rows, truth


def test_judge_probability_is_the_softmax_of_the_two_label_logits():
    tok = tokenizer()
    judge = Judge(BiasedJudgeModel(tok, bias=0.7), tok, labels=("A", "B"))
    judge.model.rng = random.Random(5)
    noise = random.Random(5).gauss(0, 0.5)
    p = judge.one_order("q?", "a good answer", "a bad answer")
    assert p == pytest.approx(1 / (1 + math.exp(-(1.5 + noise + 0.7))), rel=1e-5)


def test_both_order_averaging_restores_agreement_under_a_planted_position_bias():
    tok = tokenizer()
    rows, truth = pairs()
    judge = Judge(BiasedJudgeModel(tok, bias=3.0), tok, labels=("A", "B"))
    one = agreement(judge.label_pairs(rows, both_orders=False), truth)
    both = agreement(judge.label_pairs(rows, both_orders=True), truth)
    unbiased = agreement(Judge(BiasedJudgeModel(tok, bias=0.0), tok, labels=("A", "B")).label_pairs(rows), truth)
    print(f"agreement: one order {one:.3f}, both orders {both:.3f}, unbiased judge {unbiased:.3f}")
    assert one < 0.8 and both > 0.95 and both >= unbiased - 0.03
    labelled = judge.label_pairs(rows[:5])
    assert all(set(r) == {"prompt", "chosen", "rejected", "label"} and 0.5 <= r["label"] <= 1 for r in labelled)


def test_a_label_of_several_tokens_is_an_error():
    tok = tokenizer()
    with pytest.raises(ValueError, match=r"labels: ' A' is 2 tokens"):
        Judge(BiasedJudgeModel(tok, bias=0.0), tok)


def test_soft_label_reward_loss_is_the_cross_entropy_and_bradley_terry_at_p_1():
    from llmkit.align import reward_loss
    chosen, rejected = torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.7])
    p = torch.tensor([0.8, 0.6])
    d = chosen - rejected
    hand = [-(0.8 * math.log(1 / (1 + math.exp(-d[0]))) + 0.2 * math.log(1 / (1 + math.exp(d[0])))),
            -(0.6 * math.log(1 / (1 + math.exp(-d[1]))) + 0.4 * math.log(1 / (1 + math.exp(d[1]))))]
    assert torch.allclose(reward_loss(chosen, rejected, label=p), torch.tensor(hand))
    assert torch.allclose(reward_loss(chosen, rejected, label=torch.ones(2)), reward_loss(chosen, rejected))
