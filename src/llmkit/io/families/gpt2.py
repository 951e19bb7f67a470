"""GPT-2: learned positions, pre-LayerNorm, tanh-GELU, fused qkv, Conv1D weights, tied head.

HF layout (GPT2LMHeadModel): transformer.{wte,wpe}, transformer.h.{i}.{ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, transformer.ln_f, lm_head (tied). Conv1D stores
weights as (in, out), so every attn/mlp weight is transposed; c_attn holds [q; k; v].
Original OpenAI checkpoints have no "transformer." prefix; both load.
"""
from __future__ import annotations

from pathlib import Path

from ...config import ModelConfig
from ..rules import Rule, choice, field, linear, single_token_id
from .common import expect, ignorer, task_picker

MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.",)
TASKS = {"causal_lm": "GPT2LMHeadModel"}
IGNORED = (r"attn\.(masked_)?bias$",)
# Flags a config must have for this layout to hold it (checked by save_hf before writing).
LAYOUT = {"attn_bias": True, "attn_out_bias": True, "mlp_bias": True, "norm_bias": True, "positional": "learned",
          "gated_mlp": False, "norm": "layernorm", "norm_placement": "pre", "parallel_residual": False}
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


task_from_architectures = task_picker({"GPT2LMHeadModel": "causal_lm", "GPT2Model": "causal_lm"}, "causal_lm")
is_ignorable = ignorer(IGNORED)


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    expect(hf, {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "scale_attn_weights": True}, source, "the only GPT-2 attention llmkit builds")
    d_model = field(hf, "n_embd", source)
    return ModelConfig(
        family="gpt2", vocab_size=field(hf, "vocab_size", source), d_model=d_model,
        n_layers=field(hf, "n_layer", source), n_heads=field(hf, "n_head", source),
        d_ff=field(hf, "n_inner", source, default=4 * d_model),
        max_seq_len=field(hf, "n_positions", source, default=1024),
        norm="layernorm", norm_eps=field(hf, "layer_norm_epsilon", source, float, default=1e-5),
        activation=choice(hf, "activation_function", source, ACTIVATIONS, default="gelu_new"),
        gated_mlp=False, positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_word_embeddings=field(hf, "tie_word_embeddings", source, bool, default=True),
        bos_token_id=single_token_id(hf, "bos_token_id", source),
        eos_token_id=single_token_id(hf, "eos_token_id", source),
        pad_token_id=single_token_id(hf, "pad_token_id", source),
    )


def config_to_hf(config: ModelConfig, task: str) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
        "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads,
        "n_inner": config.d_ff, "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else config.activation,
        "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "initializer_range": config.init_std, "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout, "attn_pdrop": config.attn_dropout,
    }


def rules(config: ModelConfig, task: str) -> list[Rule]:
    out = [Rule("transformer.embed_tokens.weight", "transformer.wte.weight"),
           Rule("transformer.embed_positions.weight", "transformer.wpe.weight")]
    for i in range(config.n_layers):
        ours, theirs = f"transformer.layers.{i}", f"transformer.h.{i}"
        out += linear(f"{ours}.attn_norm", f"{theirs}.ln_1", bias=True)
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out += linear(f"{ours}.self_attn.{proj}", f"{theirs}.attn.c_attn", bias=True,
                          transpose=True, part=part, parts=3)
        out += linear(f"{ours}.self_attn.o_proj", f"{theirs}.attn.c_proj", bias=True, transpose=True)
        out += linear(f"{ours}.mlp_norm", f"{theirs}.ln_2", bias=True)
        out += linear(f"{ours}.mlp.up_proj", f"{theirs}.mlp.c_fc", bias=True, transpose=True)
        out += linear(f"{ours}.mlp.down_proj", f"{theirs}.mlp.c_proj", bias=True, transpose=True)
    out += linear("transformer.final_norm", "transformer.ln_f", bias=True)
    out.append(Rule("lm_head.weight", "lm_head.weight"))
    return out
