"""Structured pruning (llmkit.compress.structured): removing FFN channels / kv groups equals zeroing
their weights in the original model, the smaller model round-trips through save_hf / load_hf
with the expected parameter count, removing nothing is the identity, calibrated importance keeps
the output closer than random removal, and bad input."""
from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.compress.errors import CompressError
from llmkit.compress.structured import prune_attention_heads, prune_ffn_channels, shrink_ffn, shrink_heads
from llmkit.config import ModelConfig
from llmkit.io.hf import load_hf, save_hf
from llmkit.model.models import CausalLM


def tiny(seed: int = 0, family: str = "llama", **overrides) -> CausalLM:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
    if family == "gpt2":                               # biases everywhere, ungated MLP, tied head
        return CausalLM(llmkit.get_preset("gpt2-tiny", **sizes, **overrides)).eval()
    return CausalLM(ModelConfig(family="llama", **{"n_kv_heads": 2, **sizes, **overrides})).eval()


IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def zeroed_ffn(model, kept: dict) -> CausalLM:
    """The original model with the removed channels' down_proj columns zeroed: the same function."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks()):
            gone = torch.ones(block.mlp.down_proj.in_features, dtype=torch.bool)
            gone[kept[i]] = False
            block.mlp.down_proj.weight[:, gone] = 0
    return model


def zeroed_heads(model, kept: dict) -> CausalLM:
    """The original model with the o_proj columns of removed groups' query heads zeroed."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks()):
            attn = block.self_attn
            rep, hd = attn.n_heads // attn.n_kv_heads, attn.head_dim
            for g in set(range(attn.n_kv_heads)) - set(kept[i]):
                attn.o_proj.weight[:, g * rep * hd:(g + 1) * rep * hd] = 0
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("use_calibration", [False, True])
def test_ffn_channels_shrink_and_round_trip(tmp_path, family, use_calibration):
    model = tiny(family=family)
    report = prune_ffn_channels(model, 0.3, calibration=IDS if use_calibration else None)
    remove = int(0.3 * 128)
    per_channel = 64 * (3 if family == "llama" else 2) + (1 if family == "gpt2" else 0)   # rows/cols (+ up bias)
    assert report["removed"] == remove and model.config.d_ff == 128 - remove == report["d_ff"]
    assert report["parameters_before"] - report["parameters_after"] == 2 * remove * per_channel
    assert report["parameters_after"] == model.num_parameters()
    torch.testing.assert_close(logits(model), logits(zeroed_ffn(tiny(family=family), report["kept"])),
                               rtol=1e-5, atol=1e-5)
    save_hf(model, tmp_path)
    reloaded = load_hf(tmp_path).eval()
    assert reloaded.config.d_ff == 128 - remove and reloaded.num_parameters() == model.num_parameters()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads, amount, removed", [(2, 1, 1), (None, 0.5, 2), (4, 0.25, 1)])
@pytest.mark.parametrize("use_calibration", [False, True])
def test_attention_heads_shrink_and_round_trip(tmp_path, n_kv_heads, amount, removed, use_calibration):
    model = tiny(n_kv_heads=n_kv_heads)
    n_kv = n_kv_heads or 4
    report = prune_attention_heads(model, amount, calibration=IDS if use_calibration else None)
    rep, hd = 4 // n_kv, 16
    cfg = model.config
    assert report["removed"] == removed and cfg.kv_heads == n_kv - removed and cfg.n_heads == (n_kv - removed) * rep
    assert cfg.head_dim == hd and (cfg.n_kv_heads is None) == (n_kv_heads is None)
    # Per removed group: q rows and o columns of its rep heads, k and v rows of its kv head.
    per_group = 64 * hd * (2 * rep + 2)
    assert report["parameters_before"] - report["parameters_after"] == 2 * removed * per_group
    torch.testing.assert_close(logits(model), logits(zeroed_heads(tiny(n_kv_heads=n_kv_heads), report["kept"])),
                               rtol=1e-5, atol=1e-5)
    save_hf(model, tmp_path)
    reloaded = load_hf(tmp_path).eval()
    assert reloaded.num_parameters() == model.num_parameters() and reloaded.config.kv_heads == n_kv - removed
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)


def test_removing_nothing_is_the_identity():
    model = tiny()
    before = logits(model)
    for calibration in (None, IDS):
        assert prune_ffn_channels(model, 0.0, calibration)["removed"] == 0
        assert prune_attention_heads(model, 0, calibration)["removed"] == 0
        assert torch.equal(logits(model), before)
    assert model.config.d_ff == 128 and model.config.n_heads == 4


def test_the_old_config_object_is_not_mutated():
    model = tiny()
    old = model.config
    prune_ffn_channels(model, 0.5)
    assert old.d_ff == 128 and model.config.d_ff == 64 and model.transformer.config is model.config


def _uneven(seed: int) -> CausalLM:
    """A tiny model whose FFN channels differ in size (log-normal column scales of down_proj), as a
    trained model's do; on a plain random init every channel matters about equally."""
    model = tiny(seed)
    with torch.no_grad():
        for block in model.blocks():
            block.mlp.down_proj.weight.mul_(torch.randn(128).mul(1.0).exp())
    return model


def test_calibrated_channels_beat_random_channels():
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    reference = logits(_uneven(0), ids)
    model = _uneven(0)
    prune_ffn_channels(model, 0.5, calibration=ids)
    calibrated = (logits(model, ids) - reference).pow(2).mean()
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        rand = _uneven(0)
        for block in rand.blocks():
            shrink_ffn(block.mlp, torch.randperm(128, generator=g)[:64].sort().values)
        assert calibrated < (logits(rand, ids) - reference).pow(2).mean()


def test_shrink_heads_keeps_the_query_heads_of_each_kept_group():
    model = tiny()
    attn = model.blocks()[0].self_attn
    q = attn.q_proj.weight.detach().clone()                                           # (4·16, 64)
    shrink_heads(attn, torch.tensor([1]))                                             # kv group 1: q heads 2, 3
    assert torch.equal(attn.q_proj.weight, q[32:64]) and (attn.n_heads, attn.n_kv_heads) == (2, 1)


@pytest.mark.parametrize("call, message", [
    (lambda m: prune_ffn_channels(m, 1.0), r"fraction=1.0: expected a fraction in \[0, 1\)"),
    (lambda m: prune_ffn_channels(m, -0.2), r"fraction=-0.2: expected a fraction in \[0, 1\)"),
    (lambda m: prune_ffn_channels(m, 0.5, calibration=torch.rand(2, 3)), r"calibration=\(2, 3\): expected token ids"),
    (lambda m: prune_attention_heads(m, 2), r"amount=2: expected a count of kv groups in \[0, 2\)"),
    (lambda m: prune_attention_heads(m, 1.5), r"amount=1.5: expected a fraction in \[0, 1\)"),
    (lambda m: prune_attention_heads(m, "1"), r"amount='1': expected a fraction in \[0, 1\) or a count"),
    (lambda m: prune_attention_heads(tiny(positional="alibi"), 1), r"positional='alibi'"),
    (lambda m: prune_attention_heads(tiny(family="gpt2"), 1), r"family='gpt2': its Hugging Face config has no head_dim"),
])
def test_bad_input_names_field_value_and_expectation(call, message):
    model = tiny()
    with pytest.raises(CompressError, match=message):
        call(model)
    assert model.config.d_ff == 128 and model.blocks()[0].mlp.down_proj.in_features == 128
