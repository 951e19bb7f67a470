"""compress.storage: save / load round trips with bitwise-equal logits and the stored buffers kept
as they were, folder size against fp32 by the expected ratio, the loaded model on generate() and
the engine, load_artifacts and `llmkit generate` on the folder, atomic replacement, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from llmkit.cli import main
from llmkit.compress import is_quantized_dir, load_quantized, save_quantized
from llmkit.compress.quantization import QuantLinear, quantize
from llmkit.config import ModelConfig
from llmkit.generation import generate
from llmkit.infer import Engine, SamplingParams
from llmkit.io import save_hf
from llmkit.io.errors import CheckpointError
from llmkit.jobs.artifacts import load_artifacts
from llmkit.model.models import CausalLM
from llmkit.tokenizer import train_char

VARIANTS = [("int8", {}), ("int4", {"group_size": 32, "symmetric": False}), ("int3", {"group_size": 32}),
            ("nf4", {"double_quant": True}), ("w8a8", {})]
IDS = ["int8", "int4-asym", "int3", "nf4-dq", "w8a8"]
TEXT = "the quick brown fox jumps over the lazy dog 0123456789"


def tiny(vocab_size: int = 128, d_model: int = 64, d_ff: int = 128) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(family="llama", vocab_size=vocab_size, d_model=d_model, n_layers=2, n_heads=4,
                                n_kv_heads=2, d_ff=d_ff, max_seq_len=64)).eval()


def ids(batch=2, length=8, vocab=128):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def layers(model) -> dict[str, QuantLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("scheme,kw", VARIANTS, ids=IDS)
def test_round_trip_is_bitwise(tmp_path, scheme, kw):
    model = quantize(tiny(), scheme, progress=False, **kw)
    save_quantized(model, tmp_path / "q")
    assert is_quantized_dir(tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    tokens = ids()
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for name, tensor in saved_state.items():        # the buffers as stored: same dtype, same bytes
        assert loaded_state[name].dtype == tensor.dtype and torch.equal(loaded_state[name], tensor), name
    assert {p: m.extra_repr() for p, m in layers(loaded).items()} == \
        {p: m.extra_repr() for p, m in layers(model).items()}
    assert loaded.quantization_config == model.quantization_config


@pytest.mark.parametrize("scheme,kw", VARIANTS, ids=IDS)
def test_folder_is_smaller_than_fp32_by_the_expected_ratio(tmp_path, scheme, kw):
    model = tiny(d_model=128, d_ff=512)
    save_hf(model, tmp_path / "fp32")
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    quantize(model, scheme, progress=False, **kw)
    save_quantized(model, tmp_path / "q")
    quantized = sum(m.nbytes() for m in layers(model).values())
    rest = sum(p.numel() * 4 for p in model.parameters())              # embeddings, norms, head: fp32
    expected_ratio = (quantized + rest) / fp32_bytes
    ratio = (tmp_path / "q" / "model.safetensors").stat().st_size / \
        (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert ratio == pytest.approx(expected_ratio, rel=0.03)               # safetensors headers aside
    assert ratio < {"int8": 0.4, "int4": 0.3, "int3": 0.25, "nf4": 0.3, "w8a8": 0.4}[scheme]


def test_loaded_model_runs_generate_and_the_engine(tmp_path):
    model = quantize(tiny(), "int4", group_size=32, progress=False)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    prompts = ids(2, 6)
    seqs = generate(loaded, prompts, max_new_tokens=8)
    assert torch.equal(seqs, generate(model, prompts, max_new_tokens=8))
    out = Engine(loaded, max_num_seqs=4).generate([p.tolist() for p in prompts],
                                                   SamplingParams(max_tokens=8, temperature=0))
    assert out == [s[6:].tolist() for s in seqs]


@pytest.fixture
def quantized_folder(tmp_path):
    tokenizer = train_char(texts=[TEXT], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    model = quantize(tiny(vocab_size=tokenizer.vocab_size), "nf4", progress=False)
    folder = save_quantized(model, tmp_path / "q", tokenizer)
    return folder, model, tokenizer


def test_load_artifacts_reads_the_folder(quantized_folder):
    folder, model, tokenizer = quantized_folder
    saved = load_artifacts(folder)
    assert saved.task == "causal_lm" and layers(saved.model).keys() == layers(model).keys()
    tokens = ids(vocab=tokenizer.vocab_size)
    assert torch.equal(logits(saved.model, tokens), logits(model, tokens))
    assert saved.tokenizer.encode("the fox") == tokenizer.encode("the fox")
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["quantization_config"]["scheme"] == "nf4"


def test_llmkit_generate_runs_on_the_folder(quantized_folder, capsys, monkeypatch):
    monkeypatch.setenv("LLMKIT_NO_PROGRESS", "1")
    folder = quantized_folder[0]
    texts = []
    for engine in ("false", "true"):
        assert main(["generate", f"model={folder}", "prompt=the quick", "max_new_tokens=6", "do_sample=false",
                     f"engine={engine}"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_saving_over_a_folder_replaces_it_whole(tmp_path):
    save_quantized(quantize(tiny(), "int8", progress=False), tmp_path / "q")
    (tmp_path / "q" / "stale.txt").write_text("from before")
    model = quantize(tiny(), "int3", group_size=32, progress=False)
    save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]           # no temporary folders left
    assert {m.scheme for m in layers(load_quantized(tmp_path / "q")).values()} == {"int3"}


def test_is_quantized_dir_is_false_for_other_folders(tmp_path):
    save_hf(tiny(), tmp_path / "hf")
    assert not is_quantized_dir(tmp_path / "hf") and not is_quantized_dir(tmp_path / "missing")


def test_saving_an_unquantized_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no QuantLinear layer"):
        save_quantized(tiny(), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_tampered_layer_spec_is_a_clear_error(tmp_path):
    save_quantized(quantize(tiny(), "int4", group_size=32, progress=False), tmp_path / "q")
    path = tmp_path / "q" / "quantization_config.json"
    meta = json.loads(path.read_text())
    meta["quantization"]["layers"]["transformer.layers.0.mlp.up_proj"]["scheme"] = "int5"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"layers\.transformer\.layers\.0\.mlp\.up_proj.*scheme='int5'"):
        load_quantized(tmp_path / "q")
