"""Deep prompts: trained key/value prefixes in every attention layer (the `kv_prefix` slot).

Each attention layer i gets P_i = (K_i, V_i) ∈ R^{n_kv × p × d_h} twice, prepended to its keys
and values (model/attention.py); the real tokens' positions start at p (transformer.py):

    head = softmax(q [K_i; W_k x]^T / sqrt(d_h)) [V_i; W_v x]

- `prefix_tuning` (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation"): trained through a reparameterisation P = MLP(E), E ∈ R^{p×d},
  MLP(E) = W_2 tanh(W_1 E + b_1) + b_2 with W_2 ∈ R^{L·2·d_kv × h}, one MLP shared by the L
  layers (layer i reads its rows of W_2). `handle.fold()` computes P once and drops the MLP
  (inference and export). projection=False trains P directly.
  Trainable: p·d + h·d + h + (L·2·d_kv)(h + 1) with the MLP, else L · p · 2·d_kv.
- `p_tuning_v2` (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
  Universally Across Scales and Tasks"): the same deep prompts trained directly, no
  reparameterisation, with dropout on the prefix (`prefix_dropout`). Trainable: L · p · 2·d_kv.
- `apt` (Zhang et al. 2023, "Towards Adaptive Prefix Tuning for Parameter-efficient Language
  Model Fine-tuning"): a token-level gate and a layer scalar rescale each layer's prefix,

      α_i = sigmoid(h W_i + b_i) ∈ (0, 1)^p,   P̂_i = λ_i (α_i ⊙ P_i)

  with h the layer's input at the first token ([CLS]) and W_i ∈ R^{d×p}; α = λ = 1 is P-tuning v2.
  The gate reads the sequence, so APT takes bidirectional self-attention only (an encoder).
  Trainable: L · (p · 2·d_kv + d·p + p + 1).

d_kv = n_kv_heads · d_h. The prefix is initialised N(0, init_std²) (init_std=1 as HF peft's
nn.Embedding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.dropout import Dropout
from .errors import PeftError
from .prompt import check_virtual_tokens
from .registry import AdapterConfig, Method, SiteContext, register


@dataclass
class PrefixConfig(AdapterConfig):
    num_virtual_tokens: int = 20
    init_std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self.num_virtual_tokens)
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise PeftError(f"init_std={self.init_std!r}: expected a non-negative number")


@dataclass
class PrefixTuningConfig(PrefixConfig):
    projection: bool = True
    encoder_hidden_size: int = 512           # h, the MLP's hidden width

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0:
            raise PeftError(f"encoder_hidden_size={self.encoder_hidden_size!r}: expected a positive integer")


@dataclass
class PTuningV2Config(PrefixConfig):
    prefix_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prefix_dropout, (int, float)) or not 0.0 <= self.prefix_dropout < 1.0:
            raise PeftError(f"prefix_dropout={self.prefix_dropout!r}: expected a probability in [0, 1)")


@dataclass
class APTConfig(PTuningV2Config):
    pass


def kv_shape(attention: nn.Module) -> tuple[int, int]:
    return attention.n_kv_heads, attention.head_dim


class PlainPrefix(nn.Module):
    """forward(x) -> (K, V), each (B, n_kv, p, d_h); `prefix` is (p, 2, n_kv, d_h), the row layout
    of HF peft's flat (p, L·2·d_kv) table."""

    def __init__(self, prefix: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.length = prefix.shape[0]
        self.prefix = nn.Parameter(prefix)
        self.dropout = Dropout(dropout) if dropout > 0 else None

    def kv(self) -> torch.Tensor:
        return self.prefix

    def forward(self, x: torch.Tensor):
        kv = self.kv()                                                              # (p, 2, n_kv, hd)
        if self.dropout is not None:
            kv = self.dropout(kv)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, x.shape[0], -1, -1, -1)  # (2, B, n_kv, p, hd)
        return kv[0], kv[1]

    def inference_prefix(self) -> torch.Tensor:
        return self.kv().detach()


class PrefixMLP(nn.Module):
    """E (p, d) and the MLP d -> h -> L·2·d_kv, shared by the L layers' ReparamPrefix."""

    def __init__(self, p: int, d: int, hidden: int, out: int, init_std: float, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(p, d, device=device, dtype=dtype) * init_std)
        self.transform = nn.Sequential(nn.Linear(d, hidden, device=device, dtype=dtype), nn.Tanh(),
                                       nn.Linear(hidden, out, device=device, dtype=dtype))


class ReparamPrefix(PlainPrefix):
    """Layer `index`'s prefix as rows of the shared MLP's output: P_i = (W_2 tanh(W_1 E + b_1) + b_2)_i."""

    def __init__(self, mlp: PrefixMLP, index: int, n_kv: int, head_dim: int):
        nn.Module.__init__(self)
        self.mlp, self.index, self.n_kv, self.head_dim = mlp, index, n_kv, head_dim
        self.length = mlp.embedding.shape[0]
        self.dropout = None

    def kv(self) -> torch.Tensor:
        width = 2 * self.n_kv * self.head_dim
        rows = slice(self.index * width, (self.index + 1) * width)
        first, last = self.mlp.transform[0], self.mlp.transform[2]
        hidden = torch.tanh(first(self.mlp.embedding))                              # (p, h)
        out = F.linear(hidden, last.weight[rows], last.bias[rows])                  # (p, 2 d_kv)
        return out.view(self.length, 2, self.n_kv, self.head_dim)

    def folded(self) -> PlainPrefix:
        return PlainPrefix(self.kv().detach().clone())


class GatedPrefix(PlainPrefix):
    """APT: P̂ = λ (α ⊙ P), α = sigmoid(W h_0 + b) per prefix position, λ a layer scalar."""

    def __init__(self, prefix: torch.Tensor, d: int, dropout: float = 0.0):
        super().__init__(prefix, dropout)
        self.gate = nn.Linear(d, self.length, device=prefix.device, dtype=prefix.dtype)
        nn.init.zeros_(self.gate.weight), nn.init.zeros_(self.gate.bias)            # α = 1/2 at init
        self.scale = nn.Parameter(torch.ones((), device=prefix.device, dtype=prefix.dtype))   # λ

    def forward(self, x: torch.Tensor):
        k, v = super().forward(x)                                                   # (B, n_kv, p, hd)
        alpha = torch.sigmoid(self.gate(x[:, 0]))                                   # (B, p)
        g = (self.scale * alpha)[:, None, :, None]                                  # (B, 1, p, 1)
        return k * g, v * g


class _Prefix(Method):
    placement, slot, default_targets = "slot", "kv_prefix", None

    def init_prefix(self, attention: nn.Module, config: PrefixConfig) -> torch.Tensor:
        n_kv, hd = kv_shape(attention)
        w = attention.k_proj.weight
        return torch.randn(config.num_virtual_tokens, 2, n_kv, hd, device=w.device, dtype=w.dtype) * config.init_std

    def trainable_count(self, attention: nn.Module, config: PrefixConfig) -> int:
        n_kv, hd = kv_shape(attention)
        return config.num_virtual_tokens * 2 * n_kv * hd


@register
class PrefixTuning(_Prefix):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig

    def adapter_for(self, attention: nn.Module, config: PrefixTuningConfig, site: SiteContext) -> nn.Module:
        if not config.projection:
            return PlainPrefix(self.init_prefix(attention, config))
        n_kv, hd = kv_shape(attention)
        if "mlp" not in site.shared:
            w = attention.k_proj.weight
            site.shared["mlp"] = PrefixMLP(config.num_virtual_tokens, attention.q_proj.in_features,
                                           config.encoder_hidden_size, site.total * 2 * n_kv * hd,
                                           config.init_std, device=w.device, dtype=w.dtype)
        mlp = site.shared["mlp"]
        if mlp.transform[2].out_features != site.total * 2 * n_kv * hd:
            raise PeftError("prefix_tuning with projection=True: every targeted attention needs the same "
                            "key/value width (one MLP serves them all); use projection=False")
        return ReparamPrefix(mlp, site.index, n_kv, hd)

    def count_for(self, attention: nn.Module, config: PrefixTuningConfig, site: SiteContext) -> int:
        if not config.projection:
            return self.trainable_count(attention, config)
        n_kv, hd = kv_shape(attention)
        d, h, p = attention.q_proj.in_features, config.encoder_hidden_size, config.num_virtual_tokens
        shared = p * d + h * d + h + site.total * 2 * n_kv * hd if site.index == 0 else 0
        return shared + 2 * n_kv * hd * h     # its rows of W_2 (the biases of all rows sit in `shared`)


@register
class PTuningV2(_Prefix):
    name = "p_tuning_v2"
    config_class = PTuningV2Config

    def make_adapter(self, attention: nn.Module, config: PTuningV2Config) -> nn.Module:
        return PlainPrefix(self.init_prefix(attention, config), config.prefix_dropout)


@register
class APT(_Prefix):
    name = "apt"
    needs = "bidirectional self-attention (an encoder): the gate reads the whole sequence"
    config_class = APTConfig

    def accepts(self, module: nn.Module, config=None) -> bool:
        return super().accepts(module, config) and not module.cross and not module.causal

    def make_adapter(self, attention: nn.Module, config: APTConfig) -> nn.Module:
        return GatedPrefix(self.init_prefix(attention, config), attention.q_proj.in_features, config.prefix_dropout)

    def trainable_count(self, attention: nn.Module, config: APTConfig) -> int:
        p, d = config.num_virtual_tokens, attention.q_proj.in_features
        return super().trainable_count(attention, config) + d * p + p + 1
