"""BERT: bidirectional encoder, post-LayerNorm, exact GELU, learned positions, token types.

HF layout (BertForMaskedLM / BertForPreTraining; BertModel has no "bert." prefix):
bert.embeddings.{word,position,token_type}_embeddings, bert.embeddings.LayerNorm,
bert.encoder.layer.{i}.{attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
intermediate.dense, output.{dense,LayerNorm}}, bert.pooler.dense,
cls.predictions.{transform.dense, transform.LayerNorm, decoder (tied), bias}, cls.seq_relationship.
`cls.predictions.decoder.bias` is a tied alias of `cls.predictions.bias` (older transformers wrote
both; transformers 5 unties it with the word embeddings, so an untied head reads and writes both).
Legacy TF-converted checkpoints spell LayerNorm weights gamma/beta (see rules.normalize_key).
"""
from __future__ import annotations

from pathlib import Path

from ...config import ModelConfig
from ..rules import Rule, choice, field, linear, single_token_id
from .common import expect, ignorer, task_picker

MODEL_TYPES = ("bert",)
PREFIXES = ("bert.",)
TASKS = {"masked_lm": "BertForMaskedLM", "pretraining": "BertForPreTraining", "encoder": "BertModel"}
IGNORED = (
    r"embeddings\.position_ids$",                 # a buffer, arange(max_positions)
    r"^cls\.predictions\.decoder\.bias$",         # alias of cls.predictions.bias (when tied)
    r"^cls\.predictions\.decoder\.weight$",       # tied to the word embeddings (when tied)
)
# Flags a config must have for this layout to hold it (checked by save_hf before writing).
LAYOUT = {"norm": "layernorm", "norm_placement": "post", "norm_bias": True, "positional": "learned",
          "gated_mlp": False, "final_norm": False, "embed_norm": True, "attn_bias": True,
          "attn_out_bias": True, "mlp_bias": True, "parallel_residual": False, "causal": False}
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
_EXPORT_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


task_from_architectures = task_picker({v: k for k, v in TASKS.items()}, "masked_lm")
is_ignorable = ignorer(IGNORED)


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    expect(hf, {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}, source,
           "the only layout llmkit builds")
    return ModelConfig(
        family="bert", vocab_size=field(hf, "vocab_size", source), d_model=field(hf, "hidden_size", source),
        n_layers=field(hf, "num_hidden_layers", source), n_heads=field(hf, "num_attention_heads", source),
        d_ff=field(hf, "intermediate_size", source),
        max_seq_len=field(hf, "max_position_embeddings", source, default=512),
        type_vocab_size=field(hf, "type_vocab_size", source, default=2),
        norm="layernorm", norm_placement="post", norm_eps=field(hf, "layer_norm_eps", source, float, default=1e-12),
        final_norm=False, embed_norm=True,
        activation=choice(hf, "hidden_act", source, ACTIVATIONS, default="gelu"), gated_mlp=False,
        positional="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True, causal=False,
        tie_word_embeddings=field(hf, "tie_word_embeddings", source, bool, default=True),
        dropout=field(hf, "hidden_dropout_prob", source, float, default=0.1),
        attn_dropout=field(hf, "attention_probs_dropout_prob", source, float, default=0.1),
        init_std=field(hf, "initializer_range", source, float, default=0.02),
        pad_token_id=single_token_id(hf, "pad_token_id", source),
        bos_token_id=single_token_id(hf, "bos_token_id", source),
        eos_token_id=single_token_id(hf, "eos_token_id", source),
    )


def config_to_hf(config: ModelConfig, task: str) -> dict:
    return {
        "model_type": "bert", "architectures": [TASKS[task]], "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_seq_len, "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps, "hidden_act": _EXPORT_ACT[config.activation],
        "position_embedding_type": "absolute", "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attn_dropout,
        "initializer_range": config.init_std, "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    }


def rules(config: ModelConfig, task: str) -> list[Rule]:
    base = "" if task == "encoder" else "bert."   # BertModel's own keys carry no prefix
    emb = f"{base}embeddings"
    out = [Rule("transformer.embed_tokens.weight", f"{emb}.word_embeddings.weight"),
           Rule("transformer.embed_positions.weight", f"{emb}.position_embeddings.weight"),
           Rule("transformer.embed_token_types.weight", f"{emb}.token_type_embeddings.weight")]
    out += linear("transformer.embed_norm", f"{emb}.LayerNorm", bias=True)
    for i in range(config.n_layers):
        ours, theirs = f"transformer.layers.{i}", f"{base}encoder.layer.{i}"
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            out += linear(f"{ours}.self_attn.{proj}", f"{theirs}.attention.self.{name}", bias=True)
        out += linear(f"{ours}.self_attn.o_proj", f"{theirs}.attention.output.dense", bias=True)
        out += linear(f"{ours}.attn_norm", f"{theirs}.attention.output.LayerNorm", bias=True)
        out += linear(f"{ours}.mlp.up_proj", f"{theirs}.intermediate.dense", bias=True)
        out += linear(f"{ours}.mlp.down_proj", f"{theirs}.output.dense", bias=True)
        out += linear(f"{ours}.mlp_norm", f"{theirs}.output.LayerNorm", bias=True)
    out += linear("pooler.dense", f"{base}pooler.dense", bias=True)
    out += linear("mlm_head.dense", "cls.predictions.transform.dense", bias=True)
    out += linear("mlm_head.norm", "cls.predictions.transform.LayerNorm", bias=True)
    out += [Rule("mlm_head.decoder.weight", "cls.predictions.decoder.weight"),
            Rule("mlm_head.decoder.bias", "cls.predictions.bias")]
    if not config.tie_word_embeddings:  # transformers 5 unties decoder.bias too and reads it in forward
        out.append(Rule("mlm_head.decoder.bias", "cls.predictions.decoder.bias"))
    out += linear("nsp_head.proj", "cls.seq_relationship", bias=True)
    return out
