"""A Llama-family llmkit CausalLM as a GGUF file for llama.cpp, written with the `gguf` package.

GGUF (ggml's file format, ggml-org/ggml docs/gguf.md) holds key-value metadata and named tensors.
The tensors and keys are those of llama.cpp's "llama" architecture, as its convert_hf_to_gguf.py writes
them for LlamaForCausalLM / MistralForCausalLM:

    token_embd, blk.{i}.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
    ffn_down}, output_norm, output (absent when the head is tied to the embedding), rope_freqs (when
    the RoPE frequencies are scaled)

RoPE (Su et al. 2021): llmkit and HF rotate the two halves of a head, (x_i, x_{i + d/2}); GGML's
"normal" RoPE rotates adjacent pairs (x_{2i}, x_{2i+1}). So the rows of attn_q and attn_k are permuted,
per head of that projection (h heads of d_h rows each, in = d_model):
    W.reshape(h, 2, d_h / 2, in).swapaxes(1, 2).reshape(h · d_h, in)
and scaled frequencies (linear, llama3) go in as llama.cpp's frequency factors: GGML computes
theta_i = p · base^(-2i/d_h) / f_i, so f_i = w_i(unscaled) / w_i(scaled).

Storage types (`type`), chosen per tensor as llama.cpp does:
    f32    every tensor float32
    f16    2-D weights float16; 1-D tensors (norms, rope_freqs) float32, as llama.cpp expects
    q8_0   2-D weights GGML Q8_0, token_embd and output included (what convert_hf_to_gguf --outtype q8_0
           and llama_model_quantize(MOSTLY_Q8_0) both write); 1-D float32. Blocks of 32 along a row:
               d = max|x| / 127 (stored fp16),  q = round(x / d) (int8),  x' = d · q
           34 bytes per 32 weights: 8.5 bits per weight.
    q4_0   2-D weights GGML Q4_0; 1-D float32. Blocks of 32 along a row, m = the signed value of the
           largest magnitude:
               d = m / -8 (fp16),  q = min(15, trunc(x / d + 8.5)) (4 bits, two per byte),  x' = d · (q - 8)
           18 bytes per 32 weights: 4.5 bits per weight. llama_model_quantize(MOSTLY_Q4_0) keeps the
           output matrix (token_embd when tied, since it is the output then) at Q6_K; the gguf package
           cannot write Q6_K, so here that one matrix is Q8_0, the closer of the types it writes.
A row whose length is not a multiple of the 32-element block cannot be Q8_0 / Q4_0: it is float16
(convert_hf_to_gguf's fallback). general.file_type says which type the file mostly holds.

Tokenizer: llmkit's byte-level BPE (`train_bpe`, or any tokenizer.json with a BPE model and the GPT-2
ByteLevel pre-tokenizer) goes in as llama.cpp's "gpt2" tokenizer model: tokens (in their byte-level
form), token types (special added tokens CONTROL, other added ones USER_DEFINED, ids the tokenizer
lacks UNUSED), merges, bos / eos / pad ids, whether bos / eos are added (read from the
post-processor), and the chat template (llmkit's ChatML default when the tokenizer has none, since
llmkit falls back to it). Other kinds (char-level WordLevel, WordPiece, Unigram, Metaspace or
byte-fallback BPE) raise ExportError. With tokenizer=None a placeholder SentencePiece vocabulary
(<unk> <s> </s>, the byte tokens, filler pieces) is written, because llama.cpp refuses a file without
one: such a file runs on token ids only.

Architectures llama.cpp's "llama" arch cannot run (learned / ALiBi positions, LayerNorm, biases,
an ungated or non-SiLU MLP, bidirectional or encoder-decoder stacks, a sliding window shorter than the
context) raise ExportError naming the field, its value and what the llama arch expects.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import ExportError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32                      # elements per Q8_0 / Q4_0 block (QK8_0 = QK4_0 = 32 in ggml)

# llama.cpp's llama arch: what each ModelConfig field must hold (the rest have no counterpart there).
LLAMA_ARCH = {"is_encoder_decoder": False, "causal": True, "positional": "rope", "norm": "rmsnorm",
              "norm_placement": "pre", "final_norm": True, "embed_norm": False, "activation": "silu",
              "gated_mlp": True, "attn_bias": False, "attn_out_bias": False, "mlp_bias": False,
              "lm_head_bias": False, "parallel_residual": False, "type_vocab_size": 0,
              "scale_embedding": False}

# llmkit block parameter -> GGUF tensor name (per layer); the q / k rows are RoPE-permuted.
_BLOCK_TENSORS = (("attn_norm.weight", "attn_norm"), ("self_attn.q_proj.weight", "attn_q"),
                  ("self_attn.k_proj.weight", "attn_k"), ("self_attn.v_proj.weight", "attn_v"),
                  ("self_attn.o_proj.weight", "attn_output"), ("mlp_norm.weight", "ffn_norm"),
                  ("mlp.gate_proj.weight", "ffn_gate"), ("mlp.up_proj.weight", "ffn_up"),
                  ("mlp.down_proj.weight", "ffn_down"))


# ---- architecture ------------------------------------------------------------------------------
def check_llama_arch(model) -> None:
    """Raise ExportError unless llama.cpp's llama architecture computes exactly what `model` does."""
    from ..model.models import CausalLM
    if not isinstance(model, CausalLM):
        family = getattr(getattr(model, "config", None), "family", None)
        raise ExportError(f"export gguf: model={type(model).__name__} (family={family!r}): expected a CausalLM "
                          "(a decoder-only language model; merge PEFT adapters first), the only kind llama.cpp's "
                          "llama arch runs")
    c = model.config
    wrong = [f"{name}={getattr(c, name)!r} (expected {want!r})" for name, want in LLAMA_ARCH.items()
             if getattr(c, name) != want]
    if wrong:
        raise ExportError(f"export gguf: architecture family={c.family!r} is not llama.cpp's 'llama' arch "
                          f"(RoPE, pre-RMSNorm, gated SiLU MLP, no biases): {'; '.join(wrong)}")
    if c.sliding_window is not None and c.sliding_window < c.max_seq_len:
        raise ExportError(f"export gguf: sliding_window={c.sliding_window} < max_seq_len={c.max_seq_len}: "
                          "llama.cpp's llama arch attends to the whole context; expected no sliding window "
                          "or one >= max_seq_len")


# ---- tensors ------------------------------------------------------------------------------------
def permute_rope_rows(w, heads: int):
    """(heads · d_h, in) rows from rotate-half order to GGML's interleaved pairs (see the module doc)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w, heads: int):
    """The inverse of permute_rope_rows: GGML's interleaved pairs back to rotate-half order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(model) -> Iterator[tuple[str, Any]]:
    """(GGUF name, float32 numpy array) for every tensor the file holds, in convert_hf_to_gguf's order."""
    import numpy as np
    c = model.config
    state = model.state_dict()
    needed = ["transformer.embed_tokens.weight", "transformer.final_norm.weight", "lm_head.weight"] + [
        f"transformer.layers.{i}.{ours}" for i in range(c.n_layers) for ours, _ in _BLOCK_TENSORS]
    missing = [k for k in needed if k not in state]
    if missing:      # e.g. a quantized or PEFT-wrapped layer: its weight lives under other names
        raise ExportError(f"export gguf: model has no tensor {missing[0]!r} ({len(missing)} missing): expected "
                          "a plain CausalLM with float weights (merge adapters, export before quantizing)")
    sd = {k: state[k].detach().to("cpu").float().numpy() for k in needed}
    yield "token_embd.weight", sd["transformer.embed_tokens.weight"]                   # (V, d)
    if c.rope_scaling is not None:
        from ..model.positions import rope_inverse_frequencies
        plain = rope_inverse_frequencies(c.replace(rope_scaling=None))                 # (d_h / 2,)
        yield "rope_freqs.weight", (plain / rope_inverse_frequencies(c)).numpy().astype(np.float32)
    for i in range(c.n_layers):
        for ours, theirs in _BLOCK_TENSORS:
            w = sd[f"transformer.layers.{i}.{ours}"]
            if theirs in ("attn_q", "attn_k"):
                w = permute_rope_rows(w, c.n_heads if theirs == "attn_q" else c.kv_heads)  # (h · d_h, d)
            yield f"blk.{i}.{theirs}.weight", w
    yield "output_norm.weight", sd["transformer.final_norm.weight"]
    if not c.tie_word_embeddings:        # tied: llama.cpp reuses token_embd as the output matrix
        yield "output.weight", sd["lm_head.weight"]                                      # (V, d)


def tensor_qtype(name: str, array, type: str, tied: bool):
    """The GGML storage type of one tensor of a `type` file (the rules in the module docstring)."""
    import gguf
    T = gguf.GGMLQuantizationType
    if type == "f32" or array.ndim < 2:
        # 1-D tensors stay f32 in every file: ggml's CPU element-wise ops (the norm's x * w) take no
        # quantized operand, and a Q8_0 norm aborts llama.cpp at the first evaluation (binary_op).
        return T.F32
    if type == "f16" or array.shape[-1] % BLOCK:        # a row that is not whole blocks: f16
        return T.F16
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if type == "q4_0" and is_output:
        return T.Q8_0
    return T.Q8_0 if type == "q8_0" else T.Q4_0


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


# ---- metadata -----------------------------------------------------------------------------------
def _add_hparams(writer, config, type: str) -> None:
    import gguf
    c = config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"llmkit-{c.family}")
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.kv_heads)
    if c.n_heads * c.dim_per_head != c.d_model:          # an explicit head_dim: llama.cpp reads it here
        writer.add_key_length(c.dim_per_head)
        writer.add_value_length(c.dim_per_head)
    writer.add_rope_dimension_count(c.dim_per_head)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _bpe_spec(tokenizer) -> dict:
    """tokenizer.json as a dict, after checking it is the byte-level BPE llama.cpp's "gpt2" model runs."""
    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    kind = f"model {model.get('type')!r} with pre_tokenizer {pre.get('type')!r}"
    expected = ("expected a byte-level BPE (model 'BPE', pre_tokenizer 'ByteLevel' with the GPT-2 regex and "
                "no prefix space, no normalizer: what llmkit's train_bpe makes), the kind llama.cpp's "
                "'gpt2' tokenizer model runs")
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ExportError(f"export gguf: tokenizer: {kind}: {expected}")
    for key, value in (("pre_tokenizer.add_prefix_space", pre.get("add_prefix_space", False)),
                       ("pre_tokenizer.use_regex", not pre.get("use_regex", True)),
                       ("normalizer", spec.get("normalizer")), ("model.byte_fallback", model.get("byte_fallback")),
                       ("model.continuing_subword_prefix", model.get("continuing_subword_prefix")),
                       ("model.end_of_word_suffix", model.get("end_of_word_suffix"))):
        if value:
            raise ExportError(f"export gguf: tokenizer: {key}={value!r}: {expected}")
    return spec


def _adds(tokenizer, token_id: Optional[int], where: int) -> bool:
    """Whether encoding adds `token_id` at position `where` (0: bos, -1: eos), read from the output."""
    if token_id is None:
        return False
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    return len(full) > len(plain) and full[where] == token_id


def _add_bpe_vocab(writer, tokenizer, vocab_size: int) -> None:
    import gguf
    from ..tokenizer import DEFAULT_CHAT_TEMPLATE
    spec = _bpe_spec(tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ExportError(f"export gguf: tokenizer.vocab_size={tokenizer.vocab_size}: expected at most the "
                          f"model's vocab_size={vocab_size} (one embedding row per token)")
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    T = gguf.TokenType
    types = [T.UNUSED if i not in by_id else T.NORMAL if i not in added
             else T.CONTROL if added[i].get("special") else T.USER_DEFINED for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")                   # the GPT-2 split regex, what ByteLevel(use_regex) runs
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        if getattr(tokenizer, f"{role}_token_id") is not None:
            add(getattr(tokenizer, f"{role}_token_id"))
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, 0))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, -1))
    writer.add_chat_template(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)


def _add_placeholder_vocab(writer, vocab_size: int) -> None:
    """<unk> <s> </s>, the 256 byte tokens, then filler pieces: a SentencePiece vocabulary of the
    model's size, so llama.cpp loads the file; text through it means nothing (ids only)."""
    import gguf
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), vocab_size)]
    types += [T.NORMAL] * (vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types(types[:vocab_size])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


# ---- the file -----------------------------------------------------------------------------------
def export_gguf(model, path: Union[str, Path], type: str = "f16", tokenizer=None) -> Path:
    """Write `model` (a Llama-family CausalLM) to `path` as a GGUF file of storage `type`.

    type: f32 | f16 | q8_0 | q4_0 (see the module docstring for which tensor gets which GGML type).
    tokenizer: an llmkit byte-level BPE Tokenizer, or None for a placeholder vocabulary (ids only).
    Raises ExportError for an unknown type, an architecture or tokenizer llama.cpp cannot represent.
    """
    if type not in GGUF_TYPES:
        raise ExportError(f"export gguf: type={type!r}: expected one of {', '.join(GGUF_TYPES)}")
    check_llama_arch(model)
    import gguf
    c = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hparams(writer, c, type)
        if tokenizer is not None:
            _add_bpe_vocab(writer, tokenizer, c.vocab_size)
        else:
            _add_placeholder_vocab(writer, c.vocab_size)
        for name, array in llama_tensors(model):
            qtype = tensor_qtype(name, array, type, c.tie_word_embeddings)
            # quantize() gives float32 / float16 arrays, or for Q types uint8 rows of packed blocks,
            # (rows, in / 32 · bytes per block), from which add_tensor infers the (rows, in) shape.
            writer.add_tensor(name, gguf.quants.quantize(_contiguous(array), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Path(path)


def _contiguous(array):
    """A C-contiguous float32 copy when needed: the permuted q / k views are not contiguous."""
    import numpy as np
    return np.ascontiguousarray(array, dtype=np.float32)


def gguf_bits_per_weight(path: Union[str, Path]) -> float:
    """8 · (bytes of tensor data) / (number of weights), over every tensor of a GGUF file."""
    import gguf
    tensors = gguf.GGUFReader(str(path)).tensors
    return 8.0 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
