"""Decoder families (GPT-2, Llama, Mistral): parity with transformers in both directions, the
config.json RoPE spellings, sharding, legacy key names, and clear errors on bad checkpoints."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmkit
from llmkit.io import CheckpointError

transformers = pytest.importorskip("transformers")  # a test extra; CI installs it
TOL = 1e-4


def tiny_hf(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "llama":  # GQA (4 query heads, 2 kv heads) and an untied head
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=False, max_position_embeddings=128,
                                       rope_theta=5000.0)
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "mistral":  # sliding window shorter than the test sequence
        cfg = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         sliding_window=8, max_position_embeddings=128)
        return transformers.MistralForCausalLM(cfg).eval()
    raise ValueError(kind)


def logits_diff(a, b, ids, mask=None) -> float:
    with torch.no_grad():
        la = a(ids, attention_mask=mask).logits
        lb = b(ids, attention_mask=mask).logits
    if mask is not None:  # padded positions carry no meaning in either model
        keep = mask.bool()
        la, lb = la[keep], lb[keep]
    return (la - lb).abs().max().item()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_parity_both_directions(kind, tmp_path):
    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = llmkit.load_hf(tmp_path / "hf")
    ids = torch.randint(0, 300, (2, 40))
    assert logits_diff(hf, ours, ids) <= TOL
    # right padding: the padded row's real positions must still agree
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    assert logits_diff(hf, ours, ids, mask) <= TOL

    llmkit.save_hf(ours, tmp_path / "ours")
    back = getattr(transformers, type(hf).__name__).from_pretrained(tmp_path / "ours").eval()
    assert logits_diff(hf, back, ids) <= TOL


def test_mistral_window_matters(tmp_path):
    """Guard that the window is really applied: without it, logits past the window differ."""
    hf = tiny_hf("mistral")
    hf.save_pretrained(tmp_path)
    ours = llmkit.load_hf(tmp_path)
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        windowed = ours(ids).logits
        ours.transformer.sliding_window = None
        full = ours(ids).logits
    assert (windowed[:, :8] - full[:, :8]).abs().max() < 1e-6
    assert (windowed[:, 20:] - full[:, 20:]).abs().max() > 1e-3


def test_tied_weights_omitted_and_gpt2_conv1d_layout(tmp_path):
    ours = llmkit.build_model(llmkit.get_preset("gpt2-tiny"))
    llmkit.save_hf(ours, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    d = ours.config.d_model
    assert tuple(tensors["transformer.h.0.attn.c_attn.weight"].shape) == (d, 3 * d)  # Conv1D (in, out)
    q = ours.transformer.layers[0].self_attn.q_proj.weight
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.weight"][:, :d], q.detach().t())


def test_legacy_gpt2_keys_without_prefix(tmp_path):
    hf = tiny_hf("gpt2")
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)  # old cached-mask buffer: ignored
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mask buffer must not even warn
        ours = llmkit.load_hf(tmp_path)
    assert logits_diff(hf, ours, torch.randint(0, 300, (1, 16))) <= TOL


def test_sharded_roundtrip(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "hf")
    ours = llmkit.load_hf(tmp_path / "hf")
    llmkit.save_hf(ours, tmp_path / "sharded", max_shard_size=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    assert logits_diff(hf, llmkit.load_hf(tmp_path / "sharded"), torch.randint(0, 300, (1, 16))) <= TOL
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert logits_diff(hf, back, torch.randint(0, 300, (1, 16))) <= TOL
    # exporting again unsharded removes the stale shards
    llmkit.save_hf(ours, tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]


def test_rope_fields_old_and_new(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = llmkit.get_preset("llama-tiny", rope_theta=500000.0, rope_scaling=scaling)
    llmkit.save_hf(llmkit.build_model(cfg), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 500000.0 and written["rope_scaling"]["rope_type"] == "llama3"
    assert written["rope_parameters"]["rope_theta"] == 500000.0 and written["rope_parameters"]["factor"] == 8.0
    for drop in ("rope_parameters", "rope_scaling"):  # each spelling alone is enough
        only = {k: v for k, v in written.items() if k != drop}
        if drop == "rope_scaling":
            only.pop("rope_theta")
        (tmp_path / "config.json").write_text(json.dumps(only))
        loaded = llmkit.load_hf(tmp_path).config
        assert loaded.rope_theta == 500000.0 and loaded.rope_scaling["factor"] == 8.0
    # transformers reads what we wrote, and computes the same llama3 frequencies
    (tmp_path / "config.json").write_text(json.dumps(written))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = llmkit.load_hf(tmp_path)
    assert logits_diff(hf, ours, torch.randint(0, 512, (1, 100))) <= TOL


# ---- bad input: clear errors, never a partial load ----------------------------------------------

def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(CheckpointError) as err:
        llmkit.load_hf(tmp_path)
    msg = str(err.value)
    assert "config.json" in msg and "'model_type'" in msg and "'falcon'" in msg and "llama" in msg


def test_missing_and_misshapen_tensors(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        llmkit.load_hf(tmp_path)
    assert "model.safetensors" in str(err.value) and "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "missing" in str(err.value) and "[128, 64]" in str(err.value)

    wrong = dict(tensors)
    wrong["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # GQA expects (32, 64)
    save_file(wrong, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        llmkit.load_hf(tmp_path)
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[32, 64]" in msg and "[64, 64]" in msg


def test_weights_not_safetensors(tmp_path):
    tiny_hf("gpt2").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04 this is a pickle, not safetensors")
    with pytest.raises(CheckpointError) as err:
        llmkit.load_hf(tmp_path)
    assert "model.safetensors" in str(err.value) and "not a safetensors file" in str(err.value)

    (tmp_path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        llmkit.load_hf(tmp_path)
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)


def test_bad_config_value_names_key(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        llmkit.load_hf(tmp_path)
    assert "config.json" in str(err.value) and "'num_attention_heads'" in str(err.value) and "'four'" in str(err.value)


@pytest.mark.parametrize("preset, change", [("gpt2-tiny", dict(norm_bias=False)),
                                            ("llama-tiny", dict(positional="alibi"))])
def test_export_refuses_a_config_the_layout_cannot_hold(preset, change, tmp_path):
    model = llmkit.build_model(llmkit.get_preset(preset, **change))
    (name, value), = change.items()
    with pytest.raises(CheckpointError, match=f"ModelConfig.{name}={value!r}"):
        llmkit.save_hf(model, tmp_path)
    assert not any(tmp_path.iterdir())   # nothing half-written
