"""Write an llmkit Llama-family CausalLM as an f32 GGUF file that llama.cpp loads: the benchmark's way
to run the very same weights in llama.cpp (llama-cpp-python). Not a user-facing exporter: only f32
is written, and without `tokenizer` the vocabulary is a placeholder (llama.cpp needs one to load;
bench_engine feeds it token ids). With `tokenizer` (an llmkit byte-level BPE Tokenizer, what
`train_bpe` makes) its vocabulary, merges, eos and chat template go in as a GPT-2-style BPE, so
llama.cpp's server tokenizes text as llmkit and transformers do (bench_serve). `llmkit export gguf`
(the compression issue) is the real one.

Layout (llama.cpp's llama architecture, as its convert_hf_to_gguf.py writes it):
    token_embd, blk.{i}.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
    ffn_down}, output_norm, output
q and k rows are permuted from the rotate-half order (HF / llmkit) to GGML's interleaved RoPE order:
    W.reshape(h, 2, d_h / 2, d).swapaxes(1, 2).reshape(h · d_h, d)      (h = heads of that projection)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_bpe_vocab(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json's vocab and merges) as llama.cpp's "gpt2" model."""
    import json
    import gguf
    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError("write_llama_gguf: expected a byte-level BPE tokenizer (train_bpe's)")
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    by_id.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id
             else gguf.TokenType.UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_llama_gguf(model, path: Path, tokenizer=None) -> Path:
    import gguf
    c = model.config
    if c.positional != "rope" or not c.gated_mlp:
        raise ValueError("write_llama_gguf: expected a Llama-family model (RoPE, gated MLP)")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.dim_per_head)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer is not None:
        _add_bpe_vocab(writer, tokenizer, c.vocab_size)
    else:
        # placeholder SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, then filler pieces
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
        tokens += [f"\u2581t{i}" for i in range(len(tokens), c.vocab_size)]
        types += [gguf.TokenType.NORMAL] * (c.vocab_size - len(types))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens[:c.vocab_size])
        writer.add_token_scores([0.0] * c.vocab_size)
        writer.add_token_types(types[:c.vocab_size])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["transformer.embed_tokens.weight"])
    for i in range(c.n_layers):
        p, b = f"transformer.layers.{i}.", f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", sd[p + "attn_norm.weight"])
        writer.add_tensor(b + "attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.n_heads))
        writer.add_tensor(b + "attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.kv_heads))
        writer.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(b + "ffn_norm.weight", sd[p + "mlp_norm.weight"])
        writer.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["transformer.final_norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
