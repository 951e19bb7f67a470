"""The one place a recipe's `peft:` block is applied: {method: lora, **options} -> a PEFT handle.

The jobs pass the handle's callbacks to the Trainer and train on `handle.wrap_loss(loss_fn)`, so a
method's per-step hooks and penalty terms are never forgotten.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..recipes import RecipeError


def check_peft_block(block: Optional[dict]) -> None:
    if block is not None and (not isinstance(block, dict) or not isinstance(block.get("method"), str)):
        raise ValueError(f"peft={block!r}: expected a mapping with a `method` name (e.g. lora) plus its options")


def apply_peft_block(model: nn.Module, block: Optional[dict], tokenizer=None):
    """The handle of the adapters `block` asks for on `model` (in place), or None without a block.
    A prompt initialised from text (`init: text`, `init_text: ...`) is encoded with `tokenizer`."""
    if block is None:
        return None
    from .. import peft
    options = {k: v for k, v in block.items() if k != "method"}
    if options.get("init_text") is not None and tokenizer is not None:
        options["tokenizer"] = tokenizer
    try:
        return peft.apply(model, block["method"], **options)
    except peft.PeftError as exc:
        raise RecipeError(f"peft: {exc}") from exc
