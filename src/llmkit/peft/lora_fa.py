"""LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning").

    h = W0 x + (alpha / r) · B A x,   A ∈ R^{r×in} random (kaiming-uniform) and frozen,  B = 0 trained

Because A is frozen, the gradient of B needs only the rank-r activation z = A x:
    dL/dB = (alpha/r) · g^T z,   dL/dx = (alpha/r) · (g B) A,
so backward keeps z (N × r) instead of the layer input x (N × in) that LoRA keeps for dL/dA.
`_FrozenAProjection` is that custom autograd function. A is a buffer (never an optimizer param).
Trainable parameters: r · out per Linear.
"""
from __future__ import annotations

import torch
from torch import nn

from .lora import LoraAdapter, LoraConfig, lora_scale
from .registry import Method, register


class _FrozenAProjection(torch.autograd.Function):
    """y = scale · (x A^T) B^T, saving only z = x A^T (plus the parameters, which cost nothing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        z = x @ A.t()                                                             # (..., r)
        ctx.save_for_backward(z, A, B)
        ctx.scale = scale
        return (z * scale) @ B.t()                                                # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, A, B = ctx.saved_tensors
        grad_z = (grad_out @ B) * ctx.scale                                       # (..., r)
        grad_x = grad_z @ A if ctx.needs_input_grad[0] else None                  # (..., in)
        grad_B = None
        if ctx.needs_input_grad[2]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])                         # (N, out)
            grad_B = (g2.t() @ z.reshape(-1, z.shape[-1])) * ctx.scale            # (out, r)
        return grad_x, None, grad_B, None


class LoraFAAdapter(LoraAdapter):
    """LoRA's factors, ΔW and init with A a buffer, run through the custom backward above."""
    add_to = None                       # LoRA's fused path would keep x for a gradient of A

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        A = self.lora_A.detach()
        del self.lora_A
        self.register_buffer("lora_A", A)                                         # frozen, saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        A = self.lora_A.to(x.dtype) if self.lora_A.dtype != x.dtype else self.lora_A
        B = self.lora_B.to(x.dtype) if self.lora_B.dtype != x.dtype else self.lora_B   # (autocast)
        return _FrozenAProjection.apply(x, A, B, self.scale)


@register
class LoraFA(Method):
    name = "lora_fa"
    config_class = LoraConfig

    def make_adapter(self, base: nn.Module, config: LoraConfig) -> nn.Module:
        return LoraFAAdapter(base.in_features, base.out_features, config.r, lora_scale(config), config.dropout,
                             device=base.weight.device, dtype=base.weight.dtype)

    def trainable_count(self, base: nn.Module, config: LoraConfig) -> int:
        return config.r * base.out_features
