"""DyLoRA (Valipour et al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation").

Training samples one rank b ~ U{1, ..., r} per step (the same b for every layer) and runs

    h = W0 x + (alpha / b) · B[:, :b] A[:b, :] x

so every leading block of the factors learns to stand on its own. With `freeze_lower=True`
(the paper's "frozen" variant) only row b of A and column b of B receive gradients that step.
After training any rank b <= r can be chosen for inference (`set_rank(handle, b)`), with no
retraining. The rank sampling is a Trainer callback (`handle.callbacks()`).
Trainable parameters: r · (in + out) per Linear, as LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PeftError
from .lora import LoraAdapter
from .registry import LowRankConfig, Method, register


class RankState:
    """The rank every adapter of one DyLoRA adapter name uses: `train` (sampled each step) and
    `eval` (chosen for inference; None = r)."""

    def __init__(self):
        self.train: Optional[int] = None
        self.eval: Optional[int] = None


@dataclass
class DyLoraConfig(LowRankConfig):
    freeze_lower: bool = False          # train only the sampled b-th row/column (paper's frozen mode)
    eval_rank: Optional[int] = None     # rank used outside training; None = r
    state: RankState = field(default_factory=RankState, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise PeftError(f"eval_rank={self.eval_rank!r}: expected an integer in [1, r={self.r}]")
        self.state.eval = self.eval_rank


class DyLoraAdapter(LoraAdapter):
    """LoRA's factors and init, run (and merged) at rank b with scale alpha / b."""
    add_to = None                       # LoRA's fused path knows one fixed rank

    def __init__(self, in_features: int, out_features: int, config: DyLoraConfig, *, device=None, dtype=None):
        super().__init__(in_features, out_features, config.r, config.alpha / config.r, config.dropout,
                         device=device, dtype=dtype)
        self.alpha, self.freeze_lower, self.state = config.alpha, config.freeze_lower, config.state

    def rank(self) -> int:
        b = self.state.train if self.training else self.state.eval
        return min(b or self.r, self.r)

    def _factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.lora_A[:b], self.lora_B[:, :b]                                # (b, in), (out, b)
        if self.training and self.freeze_lower and b > 1:
            A = torch.cat([A[:-1].detach(), A[-1:]], dim=0)
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], dim=1)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.rank()
        A, B = self._factors(b)
        if self.dropout is not None:
            x = self.dropout(x)
        z = F.linear(x, A) * (self.alpha / b)                                     # (..., b)
        return F.linear(z, B)                                                     # (..., out)

    def delta_weight(self) -> torch.Tensor:
        b = min(self.state.eval or self.r, self.r)
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * (self.alpha / b)           # (out, in)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = min(self.state.eval or self.r, self.r)
        return self.lora_B[:, :b] * (self.alpha / b), self.lora_A[:b]


class RankSampling:
    """Trainer callback: draw b ~ U{1..r} before each step for every active DyLoRA adapter."""

    def __init__(self, handle):
        self.handle = handle

    def on_step_start(self, trainer, step: int) -> None:
        for name in self.handle.active:
            info = self.handle.adapters[name]
            if info.method == "dylora":
                info.config.state.train = int(torch.randint(1, info.config.r + 1, ()).item())

    def on_train_end(self, trainer) -> None:
        for info in self.handle.adapters.values():
            if info.method == "dylora":
                info.config.state.train = None


def set_rank(handle, b: Optional[int], adapter_name: Optional[str] = None) -> None:
    """Use rank b (<= r) outside training for every DyLoRA adapter (or one by name); None = r."""
    if handle.adapters and any(layer.merged for _, layer in handle.layers()):
        raise PeftError("set_rank: unmerge() first (the merged weights hold the previous rank)")
    names = [adapter_name] if adapter_name else [n for n, a in handle.adapters.items() if a.method == "dylora"]
    if not names:
        raise PeftError("set_rank: the model has no DyLoRA adapter")
    for name in names:
        info = handle.adapters[name]
        if b is not None and not 1 <= b <= info.config.r:
            raise PeftError(f"set_rank(b={b!r}): expected an integer in [1, r={info.config.r}]")
        info.config.state.eval = b


@register
class DyLoRA(Method):
    name = "dylora"
    config_class = DyLoraConfig

    def make_adapter(self, base: nn.Module, config: DyLoraConfig) -> nn.Module:
        return DyLoraAdapter(base.in_features, base.out_features, config,
                             device=base.weight.device, dtype=base.weight.dtype)

    def trainable_count(self, base: nn.Module, config: DyLoraConfig) -> int:
        return config.r * (base.in_features + base.out_features)

    def callbacks(self, handle) -> list:
        return [RankSampling(handle)]
