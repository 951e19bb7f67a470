"""The one place a recipe's `peft:` block is applied: {method: lora, **options} -> a PEFT handle.

The jobs pass the handle's callbacks to the Trainer and train on `handle.wrap_loss(loss_fn)`, so a
method's per-step hooks and penalty terms are never forgotten.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import nn

from ..recipes import RecipeError


def check_peft_block(block: Optional[dict]) -> None:
    if block is not None and (not isinstance(block, dict) or not isinstance(block.get("method"), str)):
        raise ValueError(f"peft={block!r}: expected a mapping with a `method` name (e.g. lora) plus its options")


def apply_peft_block(model: nn.Module, block: Optional[dict], tokenizer=None, *,
                     data: Optional[Callable[[], Iterable]] = None, loss_fn: Optional[Callable] = None):
    """The handle of the adapters `block` asks for on `model` (in place), or None without a block.
    A prompt initialised from text (`init: text`, `init_text: ...`) is encoded with `tokenizer`.
    A method that selects from data (FishMask, Fish-DiP, Child-tuning_F, SPT: `needs_data`) gets
    `batches=data()` - a loader of its own, so scoring never moves the training stream - and the
    job's `loss_fn`."""
    if block is None:
        return None
    from .. import peft
    options = {k: v for k, v in block.items() if k != "method"}
    if options.get("init_text") is not None and tokenizer is not None:
        options["tokenizer"] = tokenizer
    try:
        if getattr(peft.get_method(block["method"]), "needs_data", False) and "batches" not in options:
            if data is None or loss_fn is None:
                raise peft.PeftError(f"{block['method']} selects entries from training data, which this job "
                                     "does not pass; use it with `llmkit finetune` or from Python")
            options.update(batches=data(), loss_fn=loss_fn)
        return peft.apply(model, block["method"], **options)
    except peft.PeftError as exc:
        raise RecipeError(f"peft: {exc}") from exc
