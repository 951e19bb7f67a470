"""Which layers compression acts on: the nn.Linear layers inside the transformer blocks.

The token embedding and the output head stay in full precision by default (GPTQ, AWQ and
bitsandbytes' LLM.int8 keep them too): they are a small share of a real model's weights and the
most sensitive. Names are `model.named_modules()` paths, e.g. "transformer.layers.0.self_attn.q_proj".
"""
from __future__ import annotations

from torch import nn


def block_linears(block: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """The Linear layers of one block, in forward order (attention before the MLP)."""
    return {f"{prefix}{name}": m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def linear_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the model's blocks, keyed by its full module path."""
    paths = {id(m): name for name, m in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for block in model.blocks():
        out.update(block_linears(block, prefix=paths[id(block)] + "."))
    return out
