"""Saving and loading a handle's adapters through the codecs: the format choice, a LoRA view of
any layer method for HF peft files, the HF module names the peft codec is given as data, and the
one shape-checked copy every loaded tensor goes through. Works on the handle it is given (it
never imports handle.py); `PeftHandle.record` / `.attach` are the two ends.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..io.errors import CheckpointError
from . import peft_format, serialization
from .errors import PeftError
from .registry import get_method
from .serialization import AdapterRecord

FORMATS = ("llmkit", "peft")


def save(handle, directory, format: str = "llmkit", adapter_name: Optional[str] = None) -> Path:
    """format="llmkit": every adapter (or `adapter_name`) of any method, exactly; "peft": one
    adapter as HF PEFT LoRA files."""
    if format not in FORMATS:
        raise PeftError(f"format={format!r}: expected one of {list(FORMATS)}")
    if not handle.adapters:
        raise PeftError("save: the handle has no adapter (merge_and_unload() spends it)")
    if adapter_name is not None and adapter_name not in handle.adapters:
        raise PeftError(f"adapter_name={adapter_name!r}: expected one of {list(handle.adapters)}")
    if format == "llmkit":
        return serialization.write(directory, [handle.record(n) for n in ([adapter_name] if adapter_name
                                                                            else handle.adapters)])
    name = adapter_name or (handle.active[0] if len(handle.active) == 1 else None)
    if name is None:
        raise PeftError(f"save(format='peft') writes one adapter: pass adapter_name= one of {list(handle.adapters)}")
    return peft_format.write(directory, [lora_record(handle, name)], hf_rules(handle.model),
                             {n for n, layer in handle.layers() if layer.is_embedding})


def lora_record(handle, name: str) -> AdapterRecord:
    """Adapter `name` as a LoRA record: a plain LoRA's own factors, else ΔW = B' A' with the
    method's scale folded into B'."""
    record, info = handle.record(name), handle.adapters[name]
    adapters = {t: handle.model.get_submodule(t).named[name] for t in info.targets}
    if get_method(info.method).placement != "layer" or not all(hasattr(a, "factors") for a in adapters.values()):
        raise PeftError(f"format='peft' writes LoRA-shaped layer adapters; {info.method!r} is not one: "
                        "save with format='llmkit'")
    if info.method == "lora":
        return record
    targets = {t: dict(zip(("lora_B", "lora_A"), (f.detach().cpu() for f in a.factors()))) for t, a in adapters.items()}
    return dataclasses.replace(record, method="lora", targets=targets,
                               config={**record.config, "scale": 1.0, "rslora": False})


def read(model: nn.Module, directory, adapter_name: Optional[str] = None) -> list[AdapterRecord]:
    """The records in `directory` for `model`: a peft directory's one adapter named `adapter_name`
    (default "default"), an llmkit one's adapters (only `adapter_name` if given)."""
    if "peft_type" in serialization.read_config(directory):
        records = peft_format.read(directory, hf_rules(model))
        records[0].name = adapter_name or "default"
        return records
    records = serialization.read(directory)
    chosen = [r for r in records if adapter_name in (None, r.name)]
    if not chosen:
        raise CheckpointError(f"{Path(directory)}: no adapter {adapter_name!r} (found {sorted(r.name for r in records)})")
    return chosen


def copy_checked(module: nn.Module, tensors: dict[str, torch.Tensor], where: str, optional=()) -> None:
    """Copy saved tensors into `module`'s state (in its dtype) once names match exactly (the
    `optional` ones may be absent) and every shape does."""
    state = module.state_dict(keep_vars=True)
    missing, unknown = sorted(set(state) - set(tensors) - set(optional)), sorted(set(tensors) - set(state))
    if missing or unknown:
        raise CheckpointError(f"{where}: expected tensors {sorted(state)}; missing {missing}, unknown {unknown}")
    for key, tensor in tensors.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}.{key}: expected shape {list(state[key].shape)} (from this model's "
                                  f"layer), found {list(tensor.shape)}: the adapter was made for a model with "
                                  "different layer sizes")
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor.to(state[key].dtype))


def hf_rules(model: nn.Module) -> Optional[dict]:
    """llmkit tensor key -> its io `Rule` (HF name, fused part) for an llmkit model save_hf can
    export; None for any other torch module (names are then used as they are)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "family"):
        return None
    from ..io.families import FAMILIES
    from ..io.hf import task_of
    if config.family not in FAMILIES:
        raise PeftError(f"format='peft': ModelConfig.family={config.family!r} has no Hugging Face layout "
                        f"(expected one of {sorted(FAMILIES)}); save with format='llmkit'")
    try:
        return {rule.ours: rule for rule in FAMILIES[config.family].rules(config, task_of(model))}
    except CheckpointError as exc:
        raise PeftError(f"format='peft' needs a model llmkit.save_hf can export ({exc}); "
                        "save with format='llmkit'") from exc
