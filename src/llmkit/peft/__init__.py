"""llmkit.peft: parameter-efficient fine-tuning behind one handle.

    handle = llmkit.peft.apply(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    handle.trainable_parameters()          # -> count, percent
    Trainer(model, handle.wrap_loss(loss_fn), data, callbacks=handle.callbacks())
    with handle.disable(): ...             # the base model (e.g. DPO's reference)
    handle.merge(); handle.unmerge(); model = handle.merge_and_unload()
    handle.fold()                          # training-time reparameterisations -> inference form
    handle.save("out", format="peft")      # HF PEFT files;  format="llmkit" carries every method
    handle = llmkit.peft.load(model, "out")

Methods (METHODS): lora, dylora, adalora, lora_fa; serial_adapter, parallel_adapter, coda,
prompt_tuning, prefix_tuning, p_tuning_v2, apt, ia3; bitfit, pafi, diff_pruning,
fishmask, fish_dip, child_tuning, far, xattn, spt. A new method subclasses `registry.Method`
(placement "layer", "slot" or "model") and registers itself with `@register`. apply() freezes
every model parameter outside the active adapters (and the modules_to_save copies), so the
Trainer's optimizer trains the adapters alone; a method's per-step hooks come from
`handle.callbacks()` and its penalty terms from `handle.wrap_loss(loss_fn)`.
"""
from __future__ import annotations

from torch import nn

from . import (adalora, bottleneck, coda, diff_pruning, dylora, far, fishmask, ia3, lora, lora_fa,  # noqa: F401
               prefix, prompt, selective, spt, xattn)  # (register the methods)
from .adalora import orthogonality_penalty
from .adalora_budget import budget_at
from .dylora import set_rank
from .errors import PeftError
from .handle import PeftHandle, TrainableParameters, handle_of, load
from .registry import METHODS, AdapterConfig, LowRankConfig, Method, get_method, register
from .serialization import AdapterRecord

load_adapter = load


def apply(model: nn.Module, method: str = "lora", *, adapter_name: str = "default", **config) -> PeftHandle:
    """Add adapter `adapter_name` of `method` to `model` (in place) and return the model's handle.
    Applying to a model that already has adapters adds one more and makes it active."""
    return (handle_of(model) or PeftHandle(model)).add_adapter(adapter_name, method, **config)


__all__ = ["apply", "load", "register", "METHODS", "Method", "AdapterConfig", "LowRankConfig", "AdapterRecord",
           "PeftHandle", "PeftError", "TrainableParameters", "get_method", "handle_of", "set_rank", "budget_at",
           "orthogonality_penalty"]
