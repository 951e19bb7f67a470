"""`ModelConfig`: one serializable dataclass that describes every model family llmkit builds.

Families differ by flags, never by subclasses (the litgpt idea): GPT-2 is "learned positions,
pre-LayerNorm, tanh-GELU, fused biases, tied head"; Llama is "RoPE, pre-RMSNorm, gated SiLU, no
biases"; BERT is "bidirectional, post-LayerNorm, token types"; BART is "encoder-decoder, learned
positions with an offset of 2, post-LayerNorm". Presets for tiny models of each family live in
`llmkit.presets`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(ValueError):
    """A config field holds a value llmkit cannot build; the message names field, value, expected."""


@dataclass
class ModelConfig:
    # ---- identity -------------------------------------------------------------------------------
    family: str = "llama"            # gpt2 | llama | mistral | bert | bart | custom: the HF layout it maps to
    # ---- sizes ----------------------------------------------------------------------------------
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    head_dim: Optional[int] = None    # None -> d_model // n_heads
    d_ff: int = 256
    max_seq_len: int = 512
    # ---- norms ----------------------------------------------------------------------------------
    norm: str = "rmsnorm"
    norm_placement: str = "pre"       # pre: x + f(norm(x)); post: norm(x + f(x))
    norm_eps: float = 1e-5
    norm_bias: bool = True            # LayerNorm bias (nanoGPT's bias=False drops it; RMSNorm has none)
    final_norm: bool = True           # a norm after the last block (pre-norm stacks need it)
    embed_norm: bool = False          # a norm right after the embeddings (BERT, BART)
    # ---- feed-forward ---------------------------------------------------------------------------
    activation: str = "silu"
    gated_mlp: bool = True            # down(act(gate(x)) * up(x)) instead of down(act(up(x)))
    # ---- positions ------------------------------------------------------------------------------
    positional: str = "rope"
    position_offset: int = 0          # learned positions start at this row (BART: 2)
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    # ---- biases and tying -----------------------------------------------------------------------
    attn_bias: bool = False           # bias on q/k/v projections
    attn_out_bias: bool = False       # bias on the output projection
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    # ---- attention pattern ----------------------------------------------------------------------
    causal: bool = True
    sliding_window: Optional[int] = None  # a query sees keys with q - window < k <= q
    parallel_residual: bool = False   # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-J / NeoX)
    # ---- encoder-decoder and BERT extras ---------------------------------------------------------
    is_encoder_decoder: bool = False
    n_decoder_layers: Optional[int] = None  # None -> n_layers
    type_vocab_size: int = 0          # BERT segment embeddings; 0 -> none
    scale_embedding: bool = False     # multiply token embeddings by sqrt(d_model) (BART option)
    # ---- regularisation -------------------------------------------------------------------------
    dropout: float = 0.0
    attn_dropout: float = 0.0
    # ---- special tokens -------------------------------------------------------------------------
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None
    # ---- init -----------------------------------------------------------------------------------
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # family-specific HF fields kept for a faithful export

    def __post_init__(self) -> None:
        self.validate()

    # -- derived ----------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def choice(name: str, allowed: tuple) -> None:
            if getattr(self, name) not in allowed:
                fail(name, f"one of {list(allowed)}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "a positive integer")
        choice("norm", NORMS)
        choice("norm_placement", NORM_PLACEMENTS)
        choice("activation", ACTIVATIONS)
        choice("positional", POSITIONS)
        if self.head_dim is None and self.d_model % self.n_heads:
            fail("n_heads", f"a divisor of d_model={self.d_model} (or set head_dim)")
        if self.head_dim is not None and self.head_dim <= 0:
            fail("head_dim", "a positive integer or None")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            fail("n_kv_heads", f"a positive divisor of n_heads={self.n_heads}")
        if self.positional == "rope" and self.dim_per_head % 2:
            fail("head_dim", "an even head size for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            fail("sliding_window", "a positive integer or None")
        if self.sliding_window is not None and not self.causal:
            fail("sliding_window", "None for a bidirectional model (a window needs causal=True)")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "a probability in [0, 1)")
        if self.norm_eps <= 0:
            fail("norm_eps", "a positive float")
        for name in ("position_offset", "type_vocab_size"):
            if getattr(self, name) < 0:
                fail(name, "a non-negative integer")
        if self.parallel_residual and self.norm_placement != "pre":
            fail("parallel_residual", "False unless norm_placement='pre'")
        if self.is_encoder_decoder and self.causal is False:
            fail("causal", "True for an encoder-decoder (the decoder is causal; the encoder is "
                 "always bidirectional)")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                fail("rope_scaling", f"rope_type in {list(ROPE_TYPES)}")
            if rope_type != "default" and "factor" not in self.rope_scaling:
                fail("rope_scaling", f"a 'factor' key for rope_type={rope_type!r}")
            if rope_type == "llama3":
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        fail("rope_scaling", f"a {key!r} key for rope_type='llama3'")

    # -- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"ModelConfig has no field {key!r}{hint}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def alibi_slopes(n_heads: int) -> list[float]:
    """Head slopes from Press et al. 2022 (ALiBi): a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the paper takes the slopes of the closest lower
    power of two and fills the rest with every other slope of the next power of two.
    """
    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two_slopes(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
