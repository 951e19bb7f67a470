"""Cross-attention tuning (Gheini et al. 2021, "Cross-Attention is All You Need: Adapting
Pretrained Transformers for Machine Translation"): of an encoder-decoder, only the decoder's
cross-attention trains - its query, key, value and output projections, weights and biases,
θ' = θ₀ + Δ on those, every other parameter frozen. The deltas are dense over their tensors
(selective.py), so the rest of the model stays bitwise θ₀ and the adapter file holds exactly the
cross-attention updates. A model without cross-attention (GPT-2, Llama, BERT) is an error.
Trainable: every cross-attention projection entry.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .errors import PeftError
from .registry import AdapterConfig, Method, SiteContext, register
from .selective import DeltaSet

MARK = "cross_attn."


def _params(base: nn.Linear) -> list[str]:
    return ["weight"] + (["bias"] if base.bias is not None else [])


@register
class CrossAttentionTuning(Method):
    name = "xattn"
    config_class = AdapterConfig
    default_targets = None
    needs = "an encoder-decoder with cross-attention (BART)"

    def narrow(self, names: list[str]) -> list[str]:
        chosen = [n for n in names if MARK in n]
        if not chosen:
            raise PeftError("xattn: the model has no cross-attention layers (a decoder-only or encoder-only "
                            "model); cross-attention tuning needs an encoder-decoder such as BART")
        return chosen

    def adapter_for(self, base: nn.Linear, config: AdapterConfig, site: SiteContext) -> nn.Module:
        if MARK not in site.path + ".":
            raise PeftError(f"xattn: target {site.path!r} is not inside a cross-attention module "
                            f"(expected names containing {MARK!r})")
        return DeltaSet.on(base, site, {name: (lambda: None) for name in _params(base)})

    def count_for(self, base: nn.Linear, config: AdapterConfig, site: SiteContext) -> int:
        return sum(getattr(base, name).numel() for name in _params(base))

    def accepts(self, module: nn.Module, config: Optional[AdapterConfig] = None) -> bool:
        return isinstance(module, nn.Linear)
