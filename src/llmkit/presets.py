"""Tiny presets, one per family, small enough to train on a laptop CPU in seconds.

Each is the family's real layout (flags) at toy sizes; `get_preset("llama-tiny", d_model=128)`
overrides any field.
"""
from __future__ import annotations

import difflib

from .config import ModelConfig

PRESETS: dict[str, dict] = {
    # GPT-2: learned positions, pre-LayerNorm, tanh-GELU, biases everywhere, tied head.
    "gpt2-tiny": dict(family="gpt2", vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                      max_seq_len=256, norm="layernorm", activation="gelu_tanh", gated_mlp=False,
                      positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True,
                      tie_word_embeddings=True),
    # Llama: RoPE, RMSNorm, SwiGLU, GQA, untied head, no biases.
    "llama-tiny": dict(family="llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_ff=176, max_seq_len=256, norm="rmsnorm", norm_eps=1e-6, activation="silu",
                       gated_mlp=True, positional="rope", rope_theta=10000.0),
    # Mistral: Llama plus a sliding attention window.
    "mistral-tiny": dict(family="mistral", vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, d_ff=176, max_seq_len=256, norm="rmsnorm", norm_eps=1e-6,
                         activation="silu", gated_mlp=True, positional="rope", sliding_window=32),
    # BERT: bidirectional, post-LayerNorm, exact GELU, token types, embedding norm.
    "bert-tiny": dict(family="bert", vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                      max_seq_len=256, norm="layernorm", norm_placement="post", norm_eps=1e-12,
                      final_norm=False, embed_norm=True, activation="gelu", gated_mlp=False,
                      positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True,
                      tie_word_embeddings=True, causal=False, type_vocab_size=2, pad_token_id=0),
    # BART: encoder-decoder, learned positions offset by 2, post-LayerNorm, tied head.
    "bart-tiny": dict(family="bart", vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                      max_seq_len=256, norm="layernorm", norm_placement="post", final_norm=False,
                      embed_norm=True, activation="gelu", gated_mlp=False, positional="learned",
                      position_offset=2, attn_bias=True, attn_out_bias=True, mlp_bias=True,
                      tie_word_embeddings=True, is_encoder_decoder=True, pad_token_id=1,
                      bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, sorted(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"preset={name!r} is unknown: expected one of {sorted(PRESETS)}{hint}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
