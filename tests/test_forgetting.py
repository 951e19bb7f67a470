"""Catastrophic forgetting (llmkit.finetune.forgetting): the L2-SP penalty and its gradient, the
pretraining mix, held-out perplexity against a hand computation, and the before/after report."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmkit.data import RandomWindowBatches
from llmkit.finetune.forgetting import (L2ToInitial, PairedBatches, forgetting_report, format_forgetting,
                                        heldout_perplexity, mixed_loss)
from llmkit.model import build_model
from llmkit.objectives.clm import clm_loss
from llmkit.presets import get_preset


class Wrapped(nn.Module):
    """Stands in for DistributedDataParallel: the real model sits at `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def mse_loss(model, batch):
    loss = F.mse_loss(model(batch["x"]), batch["y"])
    value = loss.item()
    return loss, {"loss": value, "mse": value}


@pytest.fixture
def tiny_lm():
    return build_model(get_preset("gpt2-tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                  max_seq_len=16), task="causal_lm")


# ---- L2 towards the initial weights ------------------------------------------------------------
def test_l2_penalty_is_zero_at_init_and_matches_the_closed_form():
    model = nn.Linear(3, 2)
    l2 = L2ToInitial(model, coef=0.4)
    assert l2.penalty(model).item() == 0.0
    delta_w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    delta_b = torch.tensor([0.25, -0.75])
    with torch.no_grad():
        model.weight += delta_w
        model.bias += delta_b
    expected = 0.4 / 2 * (delta_w.pow(2).sum() + delta_b.pow(2).sum())     # 0.2 * 15.875
    assert l2.penalty(model).item() == pytest.approx(expected.item(), rel=1e-6)
    assert l2.penalty(Wrapped(model)).item() == pytest.approx(expected.item(), rel=1e-6)   # DDP-style


def test_l2_gradient_is_coef_times_the_distance_to_init():
    model = nn.Linear(4, 3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    l2 = L2ToInitial(model, coef=2.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    l2.penalty(model).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2.5 * (p.detach() - start[name]))


def test_l2_skips_frozen_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    l2 = L2ToInitial(model, coef=1.0)
    assert set(l2.initial) == {"1.weight", "1.bias"}
    with torch.no_grad():
        model[0].weight += 10.0                  # a frozen weight moving is not penalised
    assert l2.penalty(model).item() == 0.0


def test_l2_wrap_adds_the_penalty_in_training_and_reports_it():
    model = nn.Linear(2, 1)
    batch = {"x": torch.tensor([[1.0, 2.0], [0.5, -1.0]]), "y": torch.tensor([[1.0], [0.0]])}
    l2 = L2ToInitial(model, coef=3.0)
    with torch.no_grad():
        model.weight += torch.tensor([[1.0, -1.0]])                     # ‖Δθ‖² = 2 -> penalty 3
    loss_fn = l2.wrap(mse_loss)
    task, _ = mse_loss(model, batch)
    loss, metrics = loss_fn(Wrapped(model), batch)
    assert loss.item() == pytest.approx(task.item() + 3.0)
    assert metrics["l2_init"] == pytest.approx(3.0) and metrics["mse"] == pytest.approx(task.item())
    model.eval()
    loss, metrics = loss_fn(model, batch)            # validation: the task loss alone, penalty still shown
    assert loss.item() == pytest.approx(task.item()) and metrics["l2_init"] == pytest.approx(3.0)


def test_a_strong_l2_keeps_training_closer_to_the_initial_weights():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    batch = {"x": x, "y": x @ torch.randn(4, 2) + 3.0}           # a target far from the initial map

    def distance_after_training(coef):
        torch.manual_seed(1)
        model = nn.Linear(4, 2)
        start = [p.detach().clone() for p in model.parameters()]
        loss_fn = L2ToInitial(model, coef).wrap(mse_loss) if coef else mse_loss
        for _ in range(40):                                       # plain gradient descent, lr 0.05
            loss, _ = loss_fn(model, batch)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        return math.sqrt(sum((p.detach() - s).pow(2).sum().item() for p, s in zip(model.parameters(), start)))

    free, anchored = distance_after_training(0.0), distance_after_training(5.0)
    assert anchored < 0.5 * free, (anchored, free)   # saw 0.76 vs 4.01


def test_l2_rejects_a_bad_coef():
    with pytest.raises(ValueError, match=r"L2ToInitial coef=-1.0: expected a finite number >= 0"):
        L2ToInitial(nn.Linear(2, 2), -1.0)


# ---- the pretraining mix -----------------------------------------------------------------------
def test_mixed_loss_equals_task_plus_weighted_pretraining_loss(tiny_lm):
    g = torch.Generator().manual_seed(0)
    task = {"input_ids": torch.randint(0, 32, (2, 8), generator=g),
            "labels": torch.randint(0, 32, (2, 8), generator=g)}
    task["labels"][:, :4] = -100                                  # prompt tokens masked, as in SFT
    pretrain = {"input_ids": torch.randint(0, 32, (3, 8), generator=g),
                "targets": torch.randint(0, 32, (3, 8), generator=g)}
    loss_fn = mixed_loss(clm_loss, clm_loss, weight=0.3)
    loss, metrics = loss_fn(tiny_lm, {"task": task, "pretrain": pretrain})
    task_loss, pretrain_loss = clm_loss(tiny_lm, task)[0], clm_loss(tiny_lm, pretrain)[0]
    torch.testing.assert_close(loss, task_loss + 0.3 * pretrain_loss)
    assert metrics["task_loss"] == pytest.approx(task_loss.item())
    assert metrics["pretrain_loss"] == pytest.approx(pretrain_loss.item())
    assert metrics["ppl"] == pytest.approx(math.exp(task_loss.item()), rel=1e-5)   # task metrics pass through
    assert metrics["pretrain/ppl"] == pytest.approx(math.exp(pretrain_loss.item()), rel=1e-5)
    loss.backward()                                               # one graph through both batches
    assert all(p.grad is not None for p in tiny_lm.parameters() if p.requires_grad)
    plain, _ = loss_fn(tiny_lm, task)                             # an unpaired (validation) batch
    torch.testing.assert_close(plain, task_loss)


def test_paired_batches_pair_both_streams_and_resume_exactly():
    tokens = np.arange(200) % 17
    def make():
        return PairedBatches(RandomWindowBatches(tokens, 2, 8, seed=1),
                             [{"id": torch.tensor(i)} for i in range(3)])   # a list: cycled
    pairs = make()
    for _ in range(4):
        next(pairs)
    state = pairs.state_dict()
    assert state["pretrain"] == {"drawn": 4} and state["task"]["step"] == 4
    expected = [next(pairs) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(3)]
    for a, b in zip(expected, got):
        assert set(a) == {"task", "pretrain"}
        torch.testing.assert_close(a["task"]["input_ids"], b["task"]["input_ids"])
        assert a["pretrain"]["id"] == b["pretrain"]["id"]
    assert [int(p["pretrain"]["id"]) for p in got] == [1, 2, 0]    # 4, 5, 6 mod 3: the list cycles


# ---- held-out perplexity -----------------------------------------------------------------------
def hand_nll(model, batch):
    """(sum of -log p(target), count) over non-ignored targets, by explicit log-softmax and gather."""
    logits = model(batch["input_ids"]).logits                    # (B, T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = batch["targets"] != -100                               # (B, T)
    picked = logp.gather(-1, batch["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)   # (B, T)
    return -(picked * keep).sum().item(), int(keep.sum())


def test_heldout_perplexity_is_the_token_weighted_mean_nll(tiny_lm):
    g = torch.Generator().manual_seed(3)
    full, sparse = ({"input_ids": torch.randint(0, 32, (4, 8), generator=g),
                     "targets": torch.randint(0, 32, (4, 8), generator=g)} for _ in range(2))
    sparse["targets"][:, 1:] = -100                               # 4 scored tokens against 32
    with torch.no_grad():                                         # ... and easy ones: the model's own argmax
        sparse["targets"][:, 0] = tiny_lm.eval()(sparse["input_ids"]).logits[:, 0].argmax(-1)
    tiny_lm.train()
    result = heldout_perplexity(tiny_lm, [full, sparse])
    assert tiny_lm.training                                       # train mode restored
    tiny_lm.eval()
    with torch.no_grad():
        (s1, n1), (s2, n2) = hand_nll(tiny_lm, full), hand_nll(tiny_lm, sparse)
    assert result["tokens"] == n1 + n2 == 36
    assert result["loss"] == pytest.approx((s1 + s2) / (n1 + n2), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp((s1 + s2) / (n1 + n2)), rel=1e-5)
    per_batch_mean = (s1 / n1 + s2 / n2) / 2                      # what averaging batches would give
    assert abs(per_batch_mean - result["loss"]) > 0.05, (per_batch_mean, result["loss"])


def test_heldout_perplexity_runs_without_grad_in_eval_mode_and_stops_at_max_batches(tiny_lm):
    seen = []
    def spy(model, batch):
        seen.append((model.training, torch.is_grad_enabled()))
        return clm_loss(model, batch)
    batches = ({"input_ids": torch.zeros(1, 4, dtype=torch.long), "targets": torch.ones(1, 4, dtype=torch.long)}
               for _ in range(10))
    result = heldout_perplexity(tiny_lm, batches, max_batches=3, loss_fn=spy)
    assert seen == [(False, False)] * 3 and result["tokens"] == 12


def test_heldout_perplexity_with_nothing_scored_is_an_error(tiny_lm):
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "targets": torch.full((1, 4), -100)}
    with pytest.raises(ValueError, match="1 batches held no scored target"):
        heldout_perplexity(tiny_lm, [batch])


# ---- the report --------------------------------------------------------------------------------
def test_forgetting_report_and_its_markdown():
    before = {"loss": 2.0, "ppl": math.exp(2.0), "tokens": 4096}
    after = {"loss": 2.5, "ppl": math.exp(2.5), "tokens": 4096}
    report = forgetting_report(before, after)
    assert report["delta"]["loss"] == pytest.approx(0.5)
    assert report["relative"]["loss"] == pytest.approx(0.25)
    assert report["delta"]["ppl"] == pytest.approx(math.exp(2.5) - math.exp(2.0))
    text = format_forgetting(report)
    assert "| loss (nats/token) | 2.0000 | 2.5000 | +0.5000 | +25.0% |" in text
    assert "| perplexity | 7.3891 | 12.1825 | +4.7934 | +64.9% |" in text
    assert "4,096" in text
    with pytest.raises(ValueError, match=r"forgetting_report: after lacks \['ppl'\]"):
        forgetting_report(before, {"loss": 1.0})
