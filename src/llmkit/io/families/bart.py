"""BART: encoder-decoder, learned positions offset by 2, post-LayerNorm, embedding norm, tied head.

HF layout (BartForConditionalGeneration): model.shared (token embeddings, shared by encoder,
decoder and lm_head), model.{encoder,decoder}.embed_positions (max_position_embeddings + 2 rows),
model.{encoder,decoder}.layernorm_embedding, model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj,
self_attn_layer_norm, fc1, fc2, final_layer_norm}, model.decoder.layers.{i}.{the same plus
encoder_attn.{q,k,v,out}_proj, encoder_attn_layer_norm}, final_logits_bias, lm_head (tied).
model.{encoder,decoder}.embed_tokens are aliases of model.shared (older transformers wrote them).
With tie_word_embeddings=false transformers 5 keeps them as separate tensors that its forward reads,
so they are then written (equal to model.shared) and read (llmkit has one token embedding).
Every LayerNorm is torch's default (eps 1e-5). mBART's pre-norm variant is refused.
"""
from __future__ import annotations

from pathlib import Path

from ...config import ModelConfig
from ..errors import CheckpointError
from ..rules import Rule, choice, field, linear, single_token_id
from .common import expect, ignorer, task_picker

MODEL_TYPES = ("bart",)
PREFIXES = ("model.",)
TASKS = {"seq2seq_lm": "BartForConditionalGeneration"}
IGNORED = (
    r"(encoder|decoder)\.embed_tokens\.weight$",  # aliases of model.shared (when tied)
    r"^lm_head\.weight$",                         # tied to model.shared (when tied)
    r"(encoder|decoder)\.version$",               # fairseq leftovers
)
# Flags a config must have for this layout to hold it (checked by save_hf before writing).
LAYOUT = {"norm": "layernorm", "norm_placement": "post", "norm_bias": True, "positional": "learned",
          "gated_mlp": False, "final_norm": False, "embed_norm": True, "attn_bias": True,
          "attn_out_bias": True, "mlp_bias": True, "parallel_residual": False, "position_offset": 2}
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
_EXPORT_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# Old (transformers 3.x) BART configs spell out layout switches; only BART's own values build.
_LAYOUT = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": True,
           "static_position_embeddings": False, "add_bias_logits": False}
LAYER_NORM_EPS = 1e-5


task_from_architectures = task_picker({"BartForConditionalGeneration": "seq2seq_lm", "BartModel": "seq2seq_lm"},
                                      "seq2seq_lm")
is_ignorable = ignorer(IGNORED)


def _same(hf: dict, key: str, like: str, value: int, source: Path) -> None:
    other = field(hf, key, source, default=value)
    if other != value:
        raise CheckpointError(f"{source}: key {key!r}: expected {value} (equal to {like!r}; llmkit "
                              f"builds one size for encoder and decoder), found {other!r}")


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    expect(hf, _LAYOUT, source, "BART's post-norm layout; mBART-style variants are not supported")
    n_heads = field(hf, "encoder_attention_heads", source)
    d_ff = field(hf, "encoder_ffn_dim", source)
    _same(hf, "decoder_attention_heads", "encoder_attention_heads", n_heads, source)
    _same(hf, "decoder_ffn_dim", "encoder_ffn_dim", d_ff, source)
    return ModelConfig(
        family="bart", vocab_size=field(hf, "vocab_size", source), d_model=field(hf, "d_model", source),
        n_layers=field(hf, "encoder_layers", source), n_decoder_layers=field(hf, "decoder_layers", source),
        n_heads=n_heads, d_ff=d_ff, max_seq_len=field(hf, "max_position_embeddings", source, default=1024),
        norm="layernorm", norm_placement="post", norm_eps=LAYER_NORM_EPS, final_norm=False, embed_norm=True,
        activation=choice(hf, "activation_function", source, ACTIVATIONS, default="gelu"), gated_mlp=False,
        positional="learned", position_offset=2, attn_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_word_embeddings=field(hf, "tie_word_embeddings", source, bool, default=True),
        is_encoder_decoder=True, causal=True,
        scale_embedding=field(hf, "scale_embedding", source, bool, default=False),
        dropout=field(hf, "dropout", source, float, default=0.1),
        attn_dropout=field(hf, "attention_dropout", source, float, default=0.0),
        init_std=field(hf, "init_std", source, float, default=0.02),
        pad_token_id=single_token_id(hf, "pad_token_id", source),
        bos_token_id=single_token_id(hf, "bos_token_id", source),
        eos_token_id=single_token_id(hf, "eos_token_id", source),
        decoder_start_token_id=single_token_id(hf, "decoder_start_token_id", source),
    )


def config_to_hf(config: ModelConfig, task: str) -> dict:
    return {
        "model_type": "bart", "architectures": [TASKS[task]], "is_encoder_decoder": True,
        "vocab_size": config.vocab_size, "d_model": config.d_model,
        "encoder_layers": config.n_layers, "decoder_layers": config.decoder_layers,
        "encoder_attention_heads": config.n_heads, "decoder_attention_heads": config.n_heads,
        "encoder_ffn_dim": config.d_ff, "decoder_ffn_dim": config.d_ff,
        "max_position_embeddings": config.max_seq_len, "activation_function": _EXPORT_ACT[config.activation],
        "scale_embedding": config.scale_embedding, "tie_word_embeddings": config.tie_word_embeddings,
        "dropout": config.dropout, "attention_dropout": config.attn_dropout, "activation_dropout": 0.0,
        "init_std": config.init_std, "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "forced_eos_token_id": config.eos_token_id,
    }


def _layer(ours: str, theirs: str, cross: bool) -> list[Rule]:
    out = []
    attns = (("self_attn", "self_attn", "attn_norm", "self_attn_layer_norm"),)
    if cross:
        attns += (("cross_attn", "encoder_attn", "cross_attn_norm", "encoder_attn_layer_norm"),)
    for attn, hf_attn, norm, hf_norm in attns:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hf_proj = "out_proj" if proj == "o_proj" else proj
            out += linear(f"{ours}.{attn}.{proj}", f"{theirs}.{hf_attn}.{hf_proj}", bias=True)
        out += linear(f"{ours}.{norm}", f"{theirs}.{hf_norm}", bias=True)
    out += linear(f"{ours}.mlp.up_proj", f"{theirs}.fc1", bias=True)
    out += linear(f"{ours}.mlp.down_proj", f"{theirs}.fc2", bias=True)
    out += linear(f"{ours}.mlp_norm", f"{theirs}.final_layer_norm", bias=True)
    return out


def rules(config: ModelConfig, task: str) -> list[Rule]:
    out = [Rule("transformer.embed_tokens.weight", "model.shared.weight")]
    if not config.tie_word_embeddings:  # transformers 5 then keeps (and reads) separate copies
        out += [Rule("transformer.embed_tokens.weight", f"model.{stack}.embed_tokens.weight")
                for stack in ("encoder", "decoder")]
    for stack, n_layers in (("encoder", config.n_layers), ("decoder", config.decoder_layers)):
        ours, theirs = f"transformer.{stack}", f"model.{stack}"
        out.append(Rule(f"{ours}.embed_positions.weight", f"{theirs}.embed_positions.weight"))
        out += linear(f"{ours}.embed_norm", f"{theirs}.layernorm_embedding", bias=True)
        for i in range(n_layers):
            out += _layer(f"{ours}.layers.{i}", f"{theirs}.layers.{i}", cross=stack == "decoder")
    out += [Rule("lm_head.weight", "lm_head.weight"), Rule("final_logits_bias", "final_logits_bias")]
    return out
