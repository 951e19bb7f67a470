"""PPO's pure functions on fixed tensors against values computed by hand here (issue 15, first
part): k1 / k3 KL per token, reward placement at the last real token with padding after the EOS,
GAE (γ = 1, λ = 0.95), the clipped policy and value losses on both sides of the clip, whitening, and
the KL controllers."""
from __future__ import annotations

import math

import pytest
import torch

from llmkit.align.ppo_math import (AdaptiveKL, FixedKL, gae, kl_per_token, policy_loss, token_rewards, value_loss,
                                   whiten)


def test_k1_and_k3_per_token_equal_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    # k3 = (e^δ − 1) − δ, δ = ref − logp = (−0.5, 1.0, 0)
    hand = [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0, 0.0]
    assert torch.allclose(kl_per_token(logp, ref, "k3"), torch.tensor([hand]))
    assert (kl_per_token(torch.randn(4, 9), torch.randn(4, 9), "k3") >= 0).all()    # never negative
    with pytest.raises(ValueError, match="kl_estimator='k2'"):
        kl_per_token(logp, ref, "k2")


def test_the_score_lands_on_the_last_real_token_not_on_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])     # EOS then padding
    kl = torch.full((3, 5), 0.1)
    rewards = token_rewards(torch.tensor([2.0, -1.0, 5.0]), kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.05, 1.95, 0.0, 0.0],
                             [-0.05, -0.05, -0.05, -0.05, -1.05],
                             [4.95, 0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)
    with pytest.raises(ValueError, match=r"completions \[0\] have no real token"):
        token_rewards(torch.ones(1), torch.zeros(1, 3), torch.zeros(1, 3), beta=0.1)


def test_gae_with_gamma_1_and_lambda_095_equals_the_hand_recursion():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])                       # the last position is padding
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # δ2 = 1 + 0 − 0.6 = 0.4; δ1 = 0 + 0.6 − 0.4 = 0.2; δ0 = 0 + 0.4 − 0.5 = −0.1
    a2 = 0.4
    a1 = 0.2 + 0.95 * a2
    a0 = -0.1 + 0.95 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.6, 0.0]]))


def test_clipped_policy_loss_on_both_sides_of_the_clip():
    # ratios 1.5 (above 1 + ε) and 0.5 (below 1 − ε), each with a positive and a negative advantage
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1]])
    old = torch.zeros_like(ratio)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]])
    mask = torch.ones_like(ratio)
    loss, stats = policy_loss(ratio.log(), old, adv, mask, clip=0.2)
    # per token max(−Aρ, −A clip(ρ)): (−1.2, 1.5, −0.5, 0.8, −2.2)
    per_token = [-1.2, 1.5, -0.5, 0.8, -2.2]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)     # tokens 0 and 3 took the clipped term
    assert stats["ratio"].item() == pytest.approx(5.1 / 5)


def test_clipped_value_loss_equals_the_hand_value():
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.5, 0.5, 2.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # token 0: V 1.0 -> clipped 0.7: max(1.0, 1.69) = 1.69; token 1: V 0.0 -> clipped 0.3: max(1.0, 0.49) = 1.0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_whitening_and_the_kl_controllers():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, mask)
    # mean 2, unbiased var 1 over the real entries; padding is zeroed
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6)
    assert FixedKL(0.1).update(5.0, 64) == 0.1
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=1000)
    assert c.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))          # error clipped at +0.2
    assert c.update(4.5, 100) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))        # error clipped at -0.2
