"""The CPU dropout (16-bit keep mask) and the attention path that uses it."""
from __future__ import annotations

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.model import attention as attention_module
from llmkit.model.attention import Attention, attention_with_dropout
from llmkit.model.dropout import Dropout, dropout, dropout_add, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_rate_and_scale_are_unbiased(p):
    keep, scale = keep_mask(torch.Size([400, 1000]), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (400, 1000)
    kept = keep.float().mean().item()
    # 400k Bernoulli draws: the std of the mean is <= 8e-4, so 4e-3 is a 5-sigma band.
    assert abs(kept - (1 - p)) < 4e-3
    p_quantized = round(p * 65536) / 65536
    assert scale == pytest.approx(1 / (1 - p_quantized), rel=1e-12)


def test_keep_mask_lanes_are_uniform():
    """Each of the four 16-bit lanes of a 64-bit draw drops at the same rate (a bare random_() on
    int64 would leave the top lane's sign bit always clear and drop nothing there)."""
    keep, _ = keep_mask(torch.Size([4 * 100_000]), 0.5, torch.device("cpu"))
    per_lane = keep.view(-1, 4).float().mean(0)
    assert torch.all((per_lane - 0.5).abs() < 0.01), per_lane


def test_dropout_expectation_and_gradient_use_the_same_mask():
    x = torch.randn(64, 512, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    dropped = y == 0
    assert 0.25 < dropped.float().mean().item() < 0.35
    kept_ratio = (y[~dropped] / x[~dropped]).detach()
    assert torch.allclose(kept_ratio, torch.full_like(kept_ratio, 65536 / (65536 - round(0.3 * 65536))))
    y.sum().backward()
    # d y / d x is the same scaled mask: zero exactly where the forward dropped.
    assert torch.equal(x.grad == 0, dropped)
    assert torch.allclose(x.grad[~dropped], kept_ratio)
    # Mean over many draws approaches x (E[y] = x).
    ones = torch.ones(2000, 1000)
    assert abs(dropout(ones, 0.3).mean().item() - 1.0) < 3e-3


def test_dropout_add_is_residual_plus_dropout_with_one_mask():
    torch.manual_seed(3)
    residual, y = torch.randn(8, 16, 32), torch.randn(8, 16, 32)
    torch.manual_seed(7)
    fused = dropout_add(residual, y, 0.2)
    torch.manual_seed(7)
    separate = residual + dropout(y, 0.2)
    assert torch.allclose(fused, separate, atol=1e-6)


def test_eval_mode_and_p_zero_are_identity_and_module_matches_nn_dropout_api():
    x = torch.randn(4, 8)
    module = Dropout(0.4)
    module.eval()
    assert module(x) is x
    assert torch.equal(module.add(x, x), x + x)
    assert dropout(x, 0.0, training=True) is x
    assert Dropout(0.4).state_dict() == {} and "p=0.4" in repr(Dropout(0.4))
    with pytest.raises(ValueError, match="p=1.0"):
        Dropout(1.0)


def test_seeded_dropout_repeats():
    x = torch.randn(32, 64)
    torch.manual_seed(11)
    a = dropout(x, 0.1)
    torch.manual_seed(11)
    assert torch.equal(a, dropout(x, 0.1))


def _reference_attention(q, k, v, mask, keep, scale):
    """softmax(Q K^T / sqrt(d) + M) ⊙ keep · scale, times V, by the formula."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask
    return (torch.softmax(scores, -1) * keep * scale) @ v


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "full"])
def test_attention_with_dropout_equals_the_formula(monkeypatch, mask_kind):
    torch.manual_seed(0)
    B, nh, T, hd = 2, 3, 5, 4
    q, k, v = (torch.randn(B, nh, T, hd, requires_grad=True) for _ in range(3))
    mask, is_causal = None, False
    minimum = torch.finfo(torch.float32).min
    if mask_kind == "padding":
        mask = torch.zeros(B, 1, 1, T)
        mask[0, ..., -2:] = minimum
    elif mask_kind == "causal":
        is_causal = True
    elif mask_kind == "full":
        mask = torch.randn(B, nh, T, T)
    keep = torch.rand(B * nh, T, T) > 0.25
    monkeypatch.setattr(attention_module, "keep_mask", lambda shape, p, device: (keep, 1.5))
    out = attention_with_dropout(q, k, v, mask, is_causal, 0.25)
    ref_mask = mask
    if is_causal:
        ref_mask = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), minimum)
    ref = _reference_attention(q, k, v, ref_mask, keep.view(B, nh, T, T), 1.5)
    assert torch.allclose(out, ref, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)


def test_attention_without_dropping_equals_sdpa(monkeypatch):
    """With a keep-all mask the training path equals SDPA (no dropout) on the same inputs."""
    config = ModelConfig(vocab_size=32, d_model=24, n_heads=4, n_layers=1, attn_dropout=0.1, max_seq_len=16)
    layer = Attention(config)
    x = torch.randn(2, 7, 24)
    mask = torch.zeros(2, 1, 1, 7)
    mask[1, ..., :2] = torch.finfo(torch.float32).min
    layer.eval()
    expected = layer(x, mask=mask)
    layer.train()
    monkeypatch.setattr(attention_module, "keep_mask",
                        lambda shape, p, device: (torch.ones(shape, dtype=torch.bool), 1.0))
    assert torch.allclose(layer(x, mask=mask), expected, atol=1e-6)
    # And it really is the path taken in training: a keep-half mask changes the output.
    monkeypatch.setattr(attention_module, "keep_mask",
                        lambda shape, p, device: (torch.rand(shape) > 0.5, 2.0))
    assert not torch.allclose(layer(x, mask=mask), expected, atol=1e-3)


def test_training_dropout_rate_through_a_model_block():
    """A Block in training mode drops about p of the residual branch (checked on the branch)."""
    from llmkit.model.block import Block
    config = ModelConfig(vocab_size=32, d_model=64, n_heads=4, n_layers=1, dropout=0.2, max_seq_len=16)
    block = Block(config)
    block.train()
    residual, branch = torch.zeros(16, 16, 64), torch.ones(16, 16, 64)
    out = block.dropout.add(residual, branch)
    assert abs((out == 0).float().mean().item() - 0.2) < 0.02


def test_lora_fused_add_equals_output_plus_adapter():
    from llmkit.peft.lora import LoraAdapter
    adapter = LoraAdapter(12, 10, r=4, scale=2.0)
    torch.nn.init.normal_(adapter.lora_B)
    x, out = torch.randn(3, 5, 12), torch.randn(3, 5, 10)
    assert torch.allclose(adapter.add_to(out, x), out + adapter(x), atol=1e-6)
