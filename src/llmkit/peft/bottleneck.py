"""Bottleneck adapters at block slots: serial (Houlsby et al. 2019; Pfeiffer et al. 2021) and
parallel (He et al. 2022).

- `serial_adapter` ("Parameter-Efficient Transfer Learning for NLP", Houlsby et al. 2019;
  "AdapterFusion", Pfeiffer et al. 2021): the sublayer output h becomes

      h <- h + W_up σ(W_down h + b_down) + b_up,    W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

  before the residual add. placement="houlsby" puts one after attention and one after the FFN
  (`post_attn_adapter`, `post_mlp_adapter`), "pfeiffer" one after the FFN only. W_up = b_up = 0
  at init, so the model starts as the base model.
- `parallel_adapter` ("Towards a Unified View of Parameter-Efficient Transfer Learning", He et al.
  2022): a branch fed the sublayer's input x, added to its output,

      sublayer(x) + s · W_up σ(W_down x + b_down) + b_up·s,    s = 4 by default

  on the FFN (`parallel_mlp`, the paper's best place), the attention (`parallel_attn`) or both.
  heads=n > 1 is the multi-head variant: x splits into n chunks of d/n, each with its own
  bottleneck of m/n (block-diagonal W_down, W_up), as attention's heads split d.

The bottleneck is m = `bottleneck`, or d // `reduction_factor`. Trainable parameters per slot:
2·d·m/n + m + d (n = heads, 1 for serial); slots per block: 2 for houlsby or sublayer="both", else 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.mlp import ACTIVATION_FUNCTIONS
from .errors import PeftError
from .registry import AdapterConfig, Method, register


@dataclass
class BottleneckConfig(AdapterConfig):
    bottleneck: Optional[int] = None         # m; or give reduction_factor
    reduction_factor: Optional[int] = None   # m = d // reduction_factor (16 when neither is given)
    activation: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise PeftError(f"bottleneck={self.bottleneck!r}, reduction_factor={self.reduction_factor!r}: "
                            "give one of the two")
        for key in ("bottleneck", "reduction_factor"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise PeftError(f"{key}={value!r}: expected a positive integer")
        if self.activation not in ACTIVATION_FUNCTIONS:
            raise PeftError(f"activation={self.activation!r}: expected one of {sorted(ACTIVATION_FUNCTIONS)}")

    def size(self, d: int, heads: int = 1) -> int:
        """The bottleneck m for hidden size d (checked: 1 <= m, divisible by heads)."""
        if self.bottleneck is not None:
            m = self.bottleneck
        else:
            factor = self.reduction_factor or 16
            if factor > d:
                raise PeftError(f"reduction_factor={factor}: expected at most the hidden size d={d} "
                                "(the bottleneck d // reduction_factor would be 0)")
            m = d // factor
        if m % heads or d % heads:
            raise PeftError(f"bottleneck={m} and hidden size {d}: expected both divisible by heads={heads}")
        return m


@dataclass
class SerialAdapterConfig(BottleneckConfig):
    placement: str = "houlsby"               # "houlsby": after attention and FFN; "pfeiffer": FFN only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in SERIAL_SLOTS:
            raise PeftError(f"placement={self.placement!r}: expected one of {sorted(SERIAL_SLOTS)}")


@dataclass
class ParallelAdapterConfig(BottleneckConfig):
    sublayer: str = "mlp"                    # "mlp", "attn" or "both"
    scale: float = 4.0
    heads: int = 1                           # > 1: the multi-head parallel adapter

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sublayer not in PARALLEL_SLOTS:
            raise PeftError(f"sublayer={self.sublayer!r}: expected one of {sorted(PARALLEL_SLOTS)}")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool):
            raise PeftError(f"scale={self.scale!r}: expected a number")
        if not isinstance(self.heads, int) or isinstance(self.heads, bool) or self.heads <= 0:
            raise PeftError(f"heads={self.heads!r}: expected a positive integer")


SERIAL_SLOTS = {"houlsby": ["post_attn_adapter", "post_mlp_adapter"], "pfeiffer": ["post_mlp_adapter"]}
PARALLEL_SLOTS = {"mlp": ["parallel_mlp"], "attn": ["parallel_attn"], "both": ["parallel_attn", "parallel_mlp"]}


class Bottleneck(nn.Module):
    """x -> scale · (W_up σ(W_down x + b_down) + b_up), with `heads` block-diagonal groups;
    `residual=True` adds x (a serial adapter). W_up = b_up = 0: the branch starts at zero."""

    def __init__(self, d: int, m: int, activation: str, *, heads: int = 1, scale: float = 1.0,
                 residual: bool = False, device=None, dtype=None):
        super().__init__()
        self.heads, self.scale, self.residual = heads, scale, residual
        self.act = ACTIVATION_FUNCTIONS[activation]
        g_in, g_m = d // heads, m // heads
        self.down = nn.Parameter(torch.empty(heads, g_m, g_in, device=device, dtype=dtype))   # (n, m/n, d/n)
        self.down_bias = nn.Parameter(torch.zeros(m, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(heads, g_in, g_m, device=device, dtype=dtype))     # (n, d/n, m/n)
        self.up_bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.down.view(m, g_in), a=math.sqrt(5))   # nn.Linear's init per group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.heads == 1:
            z = self.act(F.linear(x, self.down[0], self.down_bias))                         # (B, T, m)
            out = F.linear(z, self.up[0], self.up_bias)                                     # (B, T, d)
        else:
            xs = x.unflatten(-1, (self.heads, -1))                                          # (B, T, n, d/n)
            z = torch.einsum("...hi,hmi->...hm", xs, self.down).flatten(-2) + self.down_bias
            z = self.act(z).unflatten(-1, (self.heads, -1))                                 # (B, T, n, m/n)
            out = torch.einsum("...hm,him->...hi", z, self.up).flatten(-2) + self.up_bias   # (B, T, d)
        if self.scale != 1.0:
            out = out * self.scale
        return x + out if self.residual else out


def hidden_size(block: nn.Module) -> int:
    return block.mlp.down_proj.out_features


def bottleneck_count(d: int, m: int, heads: int = 1) -> int:
    return 2 * d * m // heads + m + d


@register
class SerialAdapter(Method):
    name = "serial_adapter"
    config_class = SerialAdapterConfig
    placement, slot, default_targets = "slot", "post_mlp_adapter", None

    def slots_for(self, config: SerialAdapterConfig) -> list[str]:
        return SERIAL_SLOTS[config.placement]

    def make_adapter(self, block: nn.Module, config: SerialAdapterConfig) -> nn.Module:
        d, w = hidden_size(block), block.mlp.down_proj.weight
        return Bottleneck(d, config.size(d), config.activation, residual=True, device=w.device, dtype=w.dtype)

    def trainable_count(self, block: nn.Module, config: SerialAdapterConfig) -> int:
        d = hidden_size(block)
        return bottleneck_count(d, config.size(d))


@register
class ParallelAdapter(Method):
    name = "parallel_adapter"
    config_class = ParallelAdapterConfig
    placement, slot, default_targets = "slot", "parallel_mlp", None

    def slots_for(self, config: ParallelAdapterConfig) -> list[str]:
        return PARALLEL_SLOTS[config.sublayer]

    def make_adapter(self, block: nn.Module, config: ParallelAdapterConfig) -> nn.Module:
        d, w = hidden_size(block), block.mlp.down_proj.weight
        return Bottleneck(d, config.size(d, config.heads), config.activation, heads=config.heads,
                          scale=config.scale, device=w.device, dtype=w.dtype)

    def trainable_count(self, block: nn.Module, config: ParallelAdapterConfig) -> int:
        d = hidden_size(block)
        return bottleneck_count(d, config.size(d, config.heads), config.heads)
