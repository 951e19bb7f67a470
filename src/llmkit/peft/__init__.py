"""llmkit.peft: parameter-efficient fine-tuning behind one handle.

    handle = llmkit.peft.apply(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    handle.trainable_parameters()          # -> count, percent
    with handle.disable(): ...             # the base model (e.g. DPO's reference)
    handle.merge(); handle.unmerge(); model = handle.merge_and_unload()
    handle.save("out", format="peft")      # HF PEFT files;  format="llmkit" carries every method
    handle = llmkit.peft.load(model, "out")

Methods (METHODS): lora, dylora, adalora, lora_fa. A new method subclasses `registry.Method`
and registers itself with `@register`. apply() freezes every model parameter outside the active
adapters (and the modules_to_save copies), so the Trainer's optimizer trains the adapters alone,
and installs the method's per-step hooks into `model.trainer_callbacks`.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from . import adalora, dylora, lora, lora_fa  # noqa: F401  (register the methods)
from .adalora import orthogonality_penalty
from .adalora_budget import budget_at
from .dylora import set_rank
from .errors import PeftError
from .handle import PeftHandle, TrainableParameters, handle_of
from .registry import METHODS, AdapterConfig, Method, get_method, register
from .serialization import load_adapter


def apply(model: nn.Module, method: str = "lora", *, adapter_name: str = "default", **config) -> PeftHandle:
    """Add adapter `adapter_name` of `method` to `model` (in place) and return the model's handle.
    Applying to a model that already has adapters adds one more and makes it active."""
    handle = handle_of(model) or PeftHandle(model)
    try:
        handle.add_adapter(adapter_name, method, **config)
    except Exception:
        if not handle.adapters:
            from .handle import HANDLE_ATTR
            model.__dict__.pop(HANDLE_ATTR, None)
        raise
    return handle


def load(model: nn.Module, directory, *, adapter_name: Optional[str] = None) -> PeftHandle:
    """Attach adapters saved by `handle.save` (either format) or by HF peft's save_pretrained."""
    return load_adapter(model, directory, adapter_name=adapter_name)


__all__ = ["apply", "load", "register", "METHODS", "Method", "AdapterConfig", "PeftHandle", "PeftError",
           "TrainableParameters", "get_method", "handle_of", "set_rank", "budget_at", "orthogonality_penalty"]
