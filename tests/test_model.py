"""Numeric properties of the transformer core: attention variants, positions, masks, the KV
cache, the PEFT extension points and the heads."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import llmkit
from llmkit.model import KVCache, pool
from llmkit.model.positions import apply_rope, rope_inverse_frequencies, sinusoidal_table


def causal_lm(preset="llama-tiny", **changes):
    return llmkit.build_model(llmkit.get_preset(preset, **changes)).eval()


def incremental_logits(model, ids, chunks, capacity=4):
    """Feed `ids` through a KV cache in chunks of the given sizes; concatenate the logits."""
    cache, out, start = KVCache(capacity=capacity), [], 0
    for size in chunks:
        out.append(model(ids[:, start:start + size], cache=cache).logits)
        start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("preset, changes", [
    ("llama-tiny", {}),                                      # RoPE + GQA
    ("llama-tiny", dict(n_kv_heads=1)),                      # MQA
    ("gpt2-tiny", {}),                                       # learned positions
    ("mistral-tiny", dict(sliding_window=5)),                # window shorter than the chunks
    ("llama-tiny", dict(positional="alibi")),
    ("gpt2-tiny", dict(positional="sinusoidal")),
    ("gpt2-tiny", dict(parallel_residual=True)),
    ("llama-tiny", dict(rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
])
def test_kv_cache_matches_full_forward(preset, changes):
    model = causal_lm(preset, **changes)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        # a multi-token prefill, single steps (growing the capacity-4 buffers), then a chunk
        step = incremental_logits(model, ids, [7, 1, 1, 1, 6, 1, 7])
    assert (full - step).abs().max().item() < 1e-5


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = causal_lm("llama-tiny", n_kv_heads=2)
    mha = causal_lm("llama-tiny", n_kv_heads=None)
    state = gqa.state_dict()
    hd, group = gqa.config.dim_per_head, gqa.config.n_heads // 2
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):   # (n_kv*hd, d) -> (n_heads*hd, d)
            state[key] = value.view(2, hd, -1).repeat_interleave(group, dim=0).reshape(-1, value.shape[-1])
    mha.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (gqa(ids).logits - mha(ids).logits).abs().max() < 1e-5


def test_rope_scores_depend_only_on_relative_position():
    config = llmkit.get_preset("llama-tiny")
    rotary = llmkit.model.positions.RotaryEmbedding(config)
    q, k = torch.randn(1, 1, 1, config.dim_per_head), torch.randn(1, 1, 1, config.dim_per_head)

    def score(pq, pk):
        cq, sq = rotary(torch.tensor([[pq]]), torch.float32)
        ck, sk = rotary(torch.tensor([[pk]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_llama3_scaling_keeps_high_and_divides_low_frequencies():
    base = rope_inverse_frequencies(llmkit.get_preset("llama-tiny"))
    scaled = rope_inverse_frequencies(llmkit.get_preset("llama-tiny", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    wavelength = 2 * math.pi / base
    assert torch.allclose(scaled[wavelength < 64 / 4], base[wavelength < 64 / 4])
    assert torch.allclose(scaled[wavelength > 64], base[wavelength > 64] / 8)


def test_sinusoidal_table_formula():
    table = sinusoidal_table(50, 16)
    p, i = 7, 3
    assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)


def test_padding_does_not_change_real_tokens_in_an_encoder():
    model = llmkit.build_model(llmkit.get_preset("bert-tiny"), task="encoder").eval()
    ids = torch.randint(5, 512, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        alone = model(ids).last_hidden_state
        with_pad = model(padded, attention_mask=mask).last_hidden_state[:, :10]
        unmasked = model(padded).last_hidden_state[:, :10]
    assert (alone - with_pad).abs().max() < 1e-5
    assert (alone - unmasked).abs().max() > 1e-3      # the mask is what makes them equal


def test_left_padding_with_positions_matches_unpadded():
    model = causal_lm("llama-tiny")
    ids = torch.randint(0, 512, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids).logits
        left = model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    assert (alone - left).abs().max() < 1e-5


class CachedPrefix(nn.Module):
    """kv_prefix returning a fixed (k, v) pair: the interface prefix tuning will implement."""

    def __init__(self, k, v):
        super().__init__()
        self.k, self.v = k, v

    def forward(self, x):
        return self.k.expand(x.shape[0], -1, -1, -1), self.v.expand(x.shape[0], -1, -1, -1)


def test_kv_prefix_equals_prepending_the_tokens():
    """Prefix keys/values taken from real tokens must act exactly like those tokens in context."""
    model = causal_lm("llama-tiny")
    prefix, ids = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        full = model(torch.cat([prefix, ids], 1)).logits[:, 5:]
        cache = KVCache()
        model(prefix, cache=cache)
        for i, block in enumerate(model.transformer.layers):
            block.self_attn.kv_prefix = CachedPrefix(cache.keys[i][:, :, :5], cache.values[i][:, :, :5])
        with_prefix = model(ids, position_ids=torch.arange(5, 13).unsqueeze(0)).logits
        # through a KV cache too: the prefix is prepended each step and never written into it
        cache, steps = KVCache(), []
        for start, end in ((0, 3), (3, 4), (4, 8)):
            positions = torch.arange(5 + start, 5 + end).unsqueeze(0)
            steps.append(model(ids[:, start:end], cache=cache, position_ids=positions).logits)
    assert (full - with_prefix).abs().max() < 1e-5
    assert (full - torch.cat(steps, 1)).abs().max() < 1e-5
    assert cache.length == 8


def test_adapter_slots_are_identity_until_used():
    model = causal_lm("gpt2-tiny")
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        base = model(ids).logits
        block = model.transformer.layers[0]
        block.post_attn_adapter, block.post_mlp_adapter = nn.Identity(), nn.Identity()
        zero = nn.Linear(model.config.d_model, model.config.d_model)
        nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
        block.parallel_attn, block.parallel_mlp = zero, zero
        assert (model(ids).logits - base).abs().max() < 1e-6
        nn.init.normal_(zero.weight)
        assert (model(ids).logits - base).abs().max() > 1e-3
    # slots are registered submodules, so their parameters are found, trained and saved
    assert "transformer.layers.0.parallel_attn.weight" in model.state_dict()


def test_heads_and_pooling():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))

    config = llmkit.get_preset("llama-tiny")
    value = llmkit.model.ValueModel(config).eval()
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        out = value(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]))
    assert out.values.shape == (2, 6) and torch.equal(out.logits, out.values[[0, 1], [3, 5]])
    cls = llmkit.model.SequenceClassifier(config, n_labels=3)
    tok = llmkit.model.TokenClassifier(config, n_labels=5)
    proj = llmkit.model.ProjectionModel(config, d_proj=16)
    assert cls(ids).logits.shape == (2, 3)
    assert tok(ids).logits.shape == (2, 6, 5)
    emb = proj(ids).embeddings
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_tied_head_shares_storage_and_bidirectional_encoder_sees_the_future():
    gpt2 = causal_lm("gpt2-tiny")
    assert gpt2.lm_head.weight is gpt2.transformer.embed_tokens.weight
    bert = llmkit.build_model(llmkit.get_preset("bert-tiny")).eval()
    ids = torch.randint(5, 512, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 512
    with torch.no_grad():
        assert (bert(ids).logits[:, 0] - bert(changed).logits[:, 0]).abs().max() > 1e-4
        assert (gpt2(ids).logits[:, 0] - gpt2(changed).logits[:, 0]).abs().max() < 1e-6


def test_kv_cache_rejects_a_changed_batch_and_reorders():
    cache = KVCache(capacity=4)
    k = torch.randn(2, 2, 3, 8)
    cache.update(0, k, k)
    with pytest.raises(ValueError, match="reorder"):
        cache.update(0, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    cache.reorder(torch.tensor([1]))
    keys, _ = cache.update(0, torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))  # grows past 4
    assert keys.shape == (1, 2, 5, 8) and torch.equal(keys[:, :, :3], k[1:])


def test_logits_to_keep_and_logits_index_pick_positions():
    model = causal_lm("llama-tiny")
    ids = torch.randint(0, 512, (2, 10))
    chosen = torch.zeros(2, 10, dtype=torch.bool)
    chosen[0, 2:5], chosen[1, 7] = True, True
    with torch.no_grad():
        full, last = model(ids).logits, model(ids, logits_to_keep=3).logits
        picked = model(ids, logits_index=chosen).logits
    assert last.shape == (2, 3, 512) and (full[:, -3:] - last).abs().max() < 1e-6
    assert picked.shape == (4, 512) and (full[chosen] - picked).abs().max() < 1e-6


def test_packed_documents_do_not_attend_across_boundaries():
    """Two documents packed in one row with doc_ids and restarted positions give exactly the
    logits of running each document alone."""
    model = causal_lm("llama-tiny")
    first, second = torch.randint(0, 512, (1, 6)), torch.randint(0, 512, (1, 9))
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 6 + [1] * 9])
    positions = torch.tensor([list(range(6)) + list(range(9))])
    with torch.no_grad():
        together = model(packed, doc_ids=doc_ids, position_ids=positions).logits
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
        leaky = model(packed, position_ids=positions).logits
    assert (together - alone).abs().max() < 1e-5
    assert (leaky[:, 6:] - alone[:, 6:]).abs().max() > 1e-3    # without doc_ids the second doc sees the first
