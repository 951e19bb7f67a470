"""Llama and Mistral: RoPE, RMSNorm, SwiGLU, GQA; Mistral adds a sliding attention window.

HF layout (LlamaForCausalLM): model.embed_tokens, model.layers.{i}.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head.
"""
from __future__ import annotations

from pathlib import Path

from ...config import ModelConfig
from ..rules import Rule, choice, field, linear, read_rope, single_token_id, write_rope
from .common import ignorer, task_picker

MODEL_TYPES = ("llama", "mistral")
PREFIXES = ("model.",)
TASKS = {"causal_lm": "ForCausalLM"}
IGNORED = (r"rotary_emb\.inv_freq$",)
# Flags a config must have for this layout to hold it (checked by save_hf before writing).
LAYOUT = {"norm": "rmsnorm", "norm_placement": "pre", "positional": "rope", "gated_mlp": True,
          "parallel_residual": False, "final_norm": True, "embed_norm": False, "type_vocab_size": 0}
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral"}


task_from_architectures = task_picker({f"{cls}ForCausalLM": "causal_lm" for cls in _CLASS_PREFIX.values()},
                                      "causal_lm")
is_ignorable = ignorer(IGNORED)


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    d_model = field(hf, "hidden_size", source)
    n_heads = field(hf, "num_attention_heads", source)
    head_dim = field(hf, "head_dim", source, default=None)
    theta, scaling = read_rope(hf, source)
    bias = field(hf, "attention_bias", source, bool, default=False)
    return ModelConfig(
        family=hf["model_type"], vocab_size=field(hf, "vocab_size", source), d_model=d_model,
        n_layers=field(hf, "num_hidden_layers", source), n_heads=n_heads,
        n_kv_heads=field(hf, "num_key_value_heads", source, default=n_heads),
        head_dim=None if head_dim in (None, d_model // n_heads) else head_dim,
        d_ff=field(hf, "intermediate_size", source),
        max_seq_len=field(hf, "max_position_embeddings", source, default=2048),
        norm="rmsnorm", norm_eps=field(hf, "rms_norm_eps", source, float, default=1e-6),
        activation=choice(hf, "hidden_act", source, ACTIVATIONS, default="silu"), gated_mlp=True,
        positional="rope", rope_theta=theta, rope_scaling=scaling,
        attn_bias=bias, attn_out_bias=bias, mlp_bias=field(hf, "mlp_bias", source, bool, default=False),
        tie_word_embeddings=field(hf, "tie_word_embeddings", source, bool, default=False),
        sliding_window=field(hf, "sliding_window", source, default=None) if hf.get("use_sliding_window", True) else None,
        pad_token_id=single_token_id(hf, "pad_token_id", source),
        bos_token_id=single_token_id(hf, "bos_token_id", source),
        eos_token_id=single_token_id(hf, "eos_token_id", source),
    )


def config_to_hf(config: ModelConfig, task: str) -> dict:
    hf = {
        "model_type": config.family, "architectures": [f"{_CLASS_PREFIX[config.family]}ForCausalLM"],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.dim_per_head,
        "intermediate_size": config.d_ff, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "hidden_act": {v: k for k, v in ACTIVATIONS.items()}[config.activation],
        "attention_bias": config.attn_bias, "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "initializer_range": config.init_std,
        **write_rope(config.rope_theta, config.rope_scaling),
    }
    if config.family == "mistral":
        hf["sliding_window"] = config.sliding_window
    return hf


def rules(config: ModelConfig, task: str) -> list[Rule]:
    out = [Rule("transformer.embed_tokens.weight", "model.embed_tokens.weight")]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.layers.{i}", f"model.layers.{i}"
        out += linear(f"{ours}.attn_norm", f"{theirs}.input_layernorm", bias=False)
        for proj in ("q_proj", "k_proj", "v_proj"):
            out += linear(f"{ours}.self_attn.{proj}", f"{theirs}.self_attn.{proj}", config.attn_bias)
        out += linear(f"{ours}.self_attn.o_proj", f"{theirs}.self_attn.o_proj", config.attn_out_bias)
        out += linear(f"{ours}.mlp_norm", f"{theirs}.post_attention_layernorm", bias=False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out += linear(f"{ours}.mlp.{proj}", f"{theirs}.mlp.{proj}", config.mlp_bias)
    out += linear("transformer.final_norm", "model.norm", bias=False)
    out.append(Rule("lm_head.weight", "lm_head.weight"))
    return out
