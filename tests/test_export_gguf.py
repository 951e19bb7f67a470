"""GGUF export (llmkit.export.gguf, `llmkit export gguf`): the file read back with gguf.GGUFReader has
llama.cpp's llama-arch tensors, types and metadata; every tensor dequantizes to the model's weight
(f32 exactly, f16 to its rounding, Q8_0 / Q4_0 within their grid error); bits per weight from the
stored bytes; the RoPE row permutation; refusals; the CLI. An optional check runs llama.cpp itself
when $LLMKIT_LLAMA_CPP_PYTHON names an interpreter with llama_cpp (never in CI)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import llmkit  # noqa: E402
from llmkit.cli import main  # noqa: E402
from llmkit.config import ModelConfig  # noqa: E402
from llmkit.export import ExportError, export_gguf  # noqa: E402
from llmkit.export.gguf import permute_rope_rows, unpermute_rope_rows  # noqa: E402
from llmkit.model.models import CausalLM  # noqa: E402
from llmkit.tokenizer import train_bpe, train_char  # noqa: E402

Q = gguf.GGMLQuantizationType
TEXTS = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the question"] * 8
BLOCK_NAMES = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


def llama(seed: int = 0, **overrides) -> CausalLM:
    fields = dict(family="llama", vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6)
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():                      # norms away from 1, so a mixed-up norm is seen
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(texts=TEXTS, vocab_size=300, bos_token="<s>", pad_token="<pad>")


def expected_weights(model) -> dict:
    """GGUF name -> the model's float32 weight in llmkit's (rotate-half) row order."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["transformer.embed_tokens.weight"],
           "output_norm.weight": sd["transformer.final_norm.weight"]}
    ours = ["attn_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for i in range(model.config.n_layers):
        for theirs, mine in zip(BLOCK_NAMES, ours):
            out[f"blk.{i}.{theirs}.weight"] = sd[f"transformer.layers.{i}.{mine}.weight"]
    if not model.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def read_back(path, model) -> dict:
    """GGUF name -> (GGML type, dequantized float32 array in llmkit's row order)."""
    c = model.config
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_rope_rows(w, c.n_heads if "attn_q" in t.name else c.kv_heads)
        out[t.name] = (t.tensor_type, w)
    return out


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i].tobytes().decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
                for i in f.data]
    value = f.parts[f.data[0]]
    return value.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0]


# ---- tensors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_tensors_names_shapes_types(tmp_path, kind, bpe):
    model = llama()
    path = export_gguf(model, tmp_path / "m.gguf", type=kind, tokenizer=bpe)
    tensors = gguf.GGUFReader(str(path)).tensors
    names = ["token_embd.weight"] + [f"blk.{i}.{n}.weight" for i in range(2) for n in BLOCK_NAMES] \
        + ["output_norm.weight", "output.weight"]
    assert [t.name for t in tensors] == names
    weights = expected_weights(model)
    two_d = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]
    for t in tensors:
        assert tuple(int(d) for d in reversed(t.shape)) == weights[t.name].shape     # GGUF stores (in, out)
        want = Q.F32 if weights[t.name].ndim == 1 else two_d
        if kind == "q4_0" and t.name == "output.weight":
            want = Q.Q8_0          # llama.cpp keeps the output matrix above 4 bits (Q6_K there)
        assert t.tensor_type == want, t.name


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_dequantized_tensors_equal_weights_within_the_format_error(tmp_path, kind):
    model = llama(seed=1)
    path = export_gguf(model, tmp_path / "m.gguf", type=kind)
    weights = expected_weights(model)
    for name, (qtype, got) in read_back(path, model).items():
        w = weights[name]
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, w)
        elif qtype == Q.F16:
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        else:
            # per 32-block grid step d: Q8_0 d = amax / 127, error <= d / 2; Q4_0 d = amax / 8, the grid
            # is -8d..7d so the error is <= d (at +amax). The fp16 scale adds <= amax · 2^-11.
            blocks, got_blocks = w.reshape(-1, 32), got.reshape(-1, 32)
            amax = np.abs(blocks).max(1, keepdims=True)
            bound = amax / 127 / 2 if qtype == Q.Q8_0 else amax / 8
            err = np.abs(got_blocks - blocks)
            assert (err <= bound + amax * 2.0 ** -11 + 1e-12).all(), name
            assert err.max() > 0, name                                   # it really was quantized


@pytest.mark.parametrize("kind, bits", [("q8_0", 8.5), ("q4_0", 4.5), ("f16", 16.0), ("f32", 32.0)])
def test_bits_per_weight_from_stored_bytes(tmp_path, kind, bits):
    path = export_gguf(llama(), tmp_path / "m.gguf", type=kind)
    qtype = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16, "f32": Q.F32}[kind]
    matrices = [t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2 and t.tensor_type == qtype]
    assert len(matrices) >= 15
    for t in matrices:
        assert 8 * int(t.n_bytes) / int(t.n_elements) == bits, t.name


def test_rope_permutation_interleaves_halves_and_inverts(tmp_path):
    heads, d_h = 3, 8
    w = np.random.default_rng(0).standard_normal((heads * d_h, 5)).astype(np.float32)
    p = permute_rope_rows(w, heads)
    for h in range(heads):                 # GGML row 2i pairs with 2i+1: llmkit's rows i and i + d_h / 2
        for i in range(d_h // 2):
            np.testing.assert_array_equal(p[h * d_h + 2 * i], w[h * d_h + i])
            np.testing.assert_array_equal(p[h * d_h + 2 * i + 1], w[h * d_h + d_h // 2 + i])
    np.testing.assert_array_equal(unpermute_rope_rows(p, heads), w)
    assert not np.array_equal(p, w)


def test_rows_that_are_not_whole_blocks_stay_f16_and_tied_head_is_token_embd(tmp_path):
    # d_model 48: every matrix reading d_model has rows of 48 (not 32-blocks); ffn_down reads d_ff = 64.
    model = llama(d_model=48, n_heads=4, d_ff=64, tie_word_embeddings=True)
    types = {name: qtype for name, (qtype, _) in read_back(export_gguf(model, tmp_path / "m.gguf", type="q4_0"),
                                                              model).items()}
    assert "output.weight" not in types
    assert types["token_embd.weight"] == Q.F16 and types["blk.0.attn_q.weight"] == Q.F16
    assert types["blk.0.ffn_down.weight"] == Q.Q4_0
    model = llama(tie_word_embeddings=True)   # tied and aligned: token_embd is the output: above 4 bits
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(export_gguf(model, tmp_path / "t.gguf",
                                                                            type="q4_0"))).tensors}
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.1.ffn_up.weight"] == Q.Q4_0


def test_rope_scaling_becomes_frequency_factors(tmp_path):
    from llmkit.model.positions import rope_inverse_frequencies
    model = llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    c = model.config
    factors = read_back(export_gguf(model, tmp_path / "m.gguf", type="f32"), model)["rope_freqs.weight"][1]
    # GGML: theta_i = p · base^(-2i/d) / f_i must equal llmkit's p · w_i
    base = c.rope_theta ** (-np.arange(0, c.dim_per_head, 2) / c.dim_per_head)
    np.testing.assert_allclose(base / factors, rope_inverse_frequencies(c).numpy(), rtol=1e-6)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0   # kept, blended, stretched


# ---- metadata -----------------------------------------------------------------------------------
def test_metadata_hparams_and_bpe_tokenizer(tmp_path, bpe):
    model = llama(n_layers=3)
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "m.gguf", type="q8_0", tokenizer=bpe)))
    c = model.config
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for key, want in [("llama.block_count", 3), ("llama.context_length", 64), ("llama.embedding_length", 64),
                      ("llama.feed_forward_length", 128), ("llama.attention.head_count", 4),
                      ("llama.attention.head_count_kv", 2), ("llama.rope.dimension_count", 16),
                      ("llama.vocab_size", 320)]:
        assert field(reader, key) == want, key
    assert field(reader, "llama.rope.freq_base") == np.float32(c.rope_theta)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == np.float32(c.norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 320
    assert all(tokens[i] == bpe.id_to_token(i) for i in range(bpe.vocab_size))
    assert tokens[bpe.vocab_size:] == [f"[PAD{i}]" for i in range(bpe.vocab_size, 320)]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[bpe.eos_token_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.UNUSED
    merges = __import__("json").loads(bpe.backend.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert field(reader, "tokenizer.ggml.eos_token_id") == bpe.eos_token_id
    assert field(reader, "tokenizer.ggml.bos_token_id") == bpe.bos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == bpe.pad_token_id
    assert not field(reader, "tokenizer.ggml.add_bos_token")
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


def test_add_bos_follows_the_post_processor(tmp_path):
    tok = train_bpe(texts=TEXTS, vocab_size=300, bos_token="<s>", add_bos=True)
    reader = gguf.GGUFReader(str(export_gguf(llama(), tmp_path / "m.gguf", tokenizer=tok)))
    assert field(reader, "tokenizer.ggml.add_bos_token") and not field(reader, "tokenizer.ggml.add_eos_token")


def test_placeholder_vocabulary_without_tokenizer(tmp_path):
    reader = gguf.GGUFReader(str(export_gguf(llama(), tmp_path / "m.gguf")))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(field(reader, "tokenizer.ggml.tokens")) == 320


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, words", [("gpt2-tiny", ["family='gpt2'", "positional='learned'", "'rope'"]),
                                           ("bert-tiny", ["MaskedLM", "family='bert'", "CausalLM"]),
                                           ("bart-tiny", ["Seq2SeqLM", "family='bart'", "CausalLM"])])
def test_other_architectures_are_refused(tmp_path, preset, words):
    with pytest.raises(ExportError) as err:
        export_gguf(llmkit.build_model(llmkit.get_preset(preset)), tmp_path / "m.gguf")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("overrides, words", [
    ({"attn_bias": True}, ["attn_bias=True", "expected False"]),
    ({"positional": "alibi"}, ["positional='alibi'", "expected 'rope'"]),
    ({"family": "mistral", "sliding_window": 16}, ["sliding_window=16", "max_seq_len=64"]),
])
def test_llama_variants_llama_cpp_cannot_run_are_refused(tmp_path, overrides, words):
    with pytest.raises(ExportError) as err:
        export_gguf(llama(**overrides), tmp_path / "m.gguf")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_model_with_wrapped_layers_is_refused_naming_the_tensor(tmp_path):
    model = llama()
    model.transformer.layers[0].mlp.up_proj = torch.nn.Sequential(model.transformer.layers[0].mlp.up_proj)
    with pytest.raises(ExportError, match=r"no tensor 'transformer.layers.0.mlp.up_proj.weight'"):
        export_gguf(model, tmp_path / "m.gguf")


def test_a_window_as_long_as_the_context_is_accepted(tmp_path):
    path = export_gguf(llama(family="mistral", sliding_window=64), tmp_path / "m.gguf", type="f32")
    assert field(gguf.GGUFReader(str(path)), "general.architecture") == "llama"


def test_bad_type_and_tokenizers_llama_cpp_cannot_represent(tmp_path):
    with pytest.raises(ExportError, match=r"type='q5_1': expected one of f32, f16, q8_0, q4_0"):
        export_gguf(llama(), tmp_path / "m.gguf", type="q5_1")
    with pytest.raises(ExportError, match=r"model 'WordLevel'.*byte-level BPE"):
        export_gguf(llama(), tmp_path / "m.gguf", tokenizer=train_char(texts=TEXTS))
    with pytest.raises(ExportError, match=r"tokenizer.vocab_size=300: expected at most .* vocab_size=280"):
        export_gguf(llama(vocab_size=280), tmp_path / "m.gguf", tokenizer=train_bpe(texts=TEXTS, vocab_size=300))


# ---- the command --------------------------------------------------------------------------------
def test_cli_export_gguf(tmp_path, capsys, bpe):
    from llmkit.jobs.artifacts import save_artifacts
    model = llama()
    save_artifacts(tmp_path / "model", model, bpe, job="pretrain")
    out = tmp_path / "out" / "m.gguf"
    assert main(["export", "gguf", f"model={tmp_path / 'model'}", f"out={out}", "type=q8_0"]) == 0
    assert "bits per weight" in capsys.readouterr().out
    weights = expected_weights(model)
    back = read_back(out, model)
    assert back.keys() == weights.keys() and back["blk.1.ffn_down.weight"][0] == Q.Q8_0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]          # no temporary file left
    assert main(["export", "gguf", f"model={tmp_path / 'model'}", f"out={out}", "type=q5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "type='q5'" in err and "f32, f16, q8_0, q4_0" in err


# ---- llama.cpp itself (optional, never in CI) ------------------------------------------------
LLAMA_CPP_PYTHON = os.environ.get("LLMKIT_LLAMA_CPP_PYTHON")


@pytest.mark.skipif(not LLAMA_CPP_PYTHON, reason="set LLMKIT_LLAMA_CPP_PYTHON to an interpreter with llama_cpp")
def test_llama_cpp_loads_every_type_and_f32_greedy_equals_llmkit(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    proc = subprocess.run([sys.executable, str(bench / "llama_cpp_check.py"), "--python", LLAMA_CPP_PYTHON,
                           "--random", "d_model=128,d_ff=256,n_layers=2,n_heads=4,n_kv_heads=2,vocab_size=256",
                           "--quants", "Q8_0", "--windows", "2", "--window-len", "32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
