"""Saving and loading adapters: `handle.save(dir, format=...)` and `llmkit.peft.load(model, dir)`.

format="llmkit": adapter_config.json {"format": "llmkit", "adapters": {name: {method, config,
targets, modules_to_save, rank_pattern}}, "active": [...]} and adapter_model.safetensors holding
every adapter tensor under its llmkit state-dict key (`<module>.adapters.<name>.lora_A`, AdaLoRA's
rank mask, LoRA-FA's frozen A, trained heads as `<module>.copies.<name>.<param>`). Every method,
every adapter, exactly.
format="peft": HF PEFT's LoRA files for one adapter (peft_format.py).
`load` reads either: a config with "peft_type" is a peft directory.
Files are written to a temporary name and renamed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..io.errors import CheckpointError
from ..io.safetensors_files import atomic_save_tensors, atomic_write_text, read_json
from . import peft_format
from .errors import PeftError
from .peft_format import CONFIG_FILE, WEIGHTS_FILE

FORMATS = ("llmkit", "peft")


def save_adapter(handle, directory: Union[str, Path], *, format: str = "llmkit",
                 adapter_name: Optional[str] = None) -> Path:
    if format not in FORMATS:
        raise PeftError(f"format={format!r}: expected one of {list(FORMATS)}")
    if not handle.adapters:
        raise PeftError("save: the handle has no adapter (merge_and_unload() spends it)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if format == "peft":
        name = adapter_name or (handle.active[0] if len(handle.active) == 1 else None)
        if name is None or name not in handle.adapters:
            raise PeftError(f"save(format='peft') writes one adapter: pass adapter_name= one of "
                            f"{list(handle.adapters)}")
        peft_format.export(handle, name, directory)
        return directory
    names = [adapter_name] if adapter_name else list(handle.adapters)
    tensors, entries = {}, {}
    state = handle.model.state_dict()
    for name in names:
        info = handle.adapters[name]
        marks = [f".adapters.{name}.", f".copies.{name}."]
        skip = training_state_keys(handle, name)
        for key, tensor in state.items():
            if any(m in key for m in marks) and key not in skip:
                tensors[key] = tensor.detach().contiguous().cpu()
        entries[name] = {"method": info.method, "config": info.config.to_dict(), "targets": info.targets,
                         "modules_to_save": info.saved, "rank_pattern": info.rank_pattern}
    atomic_save_tensors(tensors, directory / WEIGHTS_FILE)
    meta = {"format": "llmkit", "adapters": entries, "active": [n for n in handle.active if n in names]}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return directory


def load_adapter(model: nn.Module, directory: Union[str, Path], *, adapter_name: Optional[str] = None):
    """Attach the adapter(s) saved in `directory` (llmkit or peft format) to `model`; return the handle."""
    from safetensors.torch import load_file
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    config = read_json(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: file not found (expected the adapter's safetensors)")
    tensors = load_file(str(weights))
    if "peft_type" in config:
        return peft_format.import_adapter(model, directory, config, tensors, adapter_name or "default")
    if config.get("format") != "llmkit":
        raise CheckpointError(f"{directory / CONFIG_FILE}: expected a 'peft_type' (HF PEFT) or "
                              f"'format': 'llmkit' key, found keys {sorted(config)}")
    return _load_llmkit(model, directory, config, tensors, adapter_name)


def _load_llmkit(model, directory, meta, tensors, only: Optional[str]):
    from .handle import PeftHandle, handle_of
    handle = handle_of(model) or PeftHandle(model)
    entries = meta.get("adapters") or {}
    if only is not None and only not in entries:
        raise CheckpointError(f"{directory / CONFIG_FILE}: no adapter {only!r} (found {sorted(entries)})")
    for name, entry in entries.items():
        if only is not None and name != only:
            continue
        options = dict(entry["config"])
        options.update(targets=list(entry["targets"]), layers=None, train_head=False,
                       modules_to_save=list(entry.get("modules_to_save") or []) or None)
        handle.add_adapter(name, entry["method"], rank_pattern=entry.get("rank_pattern") or {}, **options)
        try:
            _copy_tensors(handle, directory, name, tensors)
        except Exception:
            handle.delete_adapter(name)
            raise
    active = [n for n in meta.get("active", []) if n in handle.adapters]
    if active:
        handle.set_active(active)
    return handle


def training_state_keys(handle, name: str) -> set[str]:
    """State-dict keys of adapter `name`'s training-only buffers (an adapter class lists them in
    `training_state`, e.g. AdaLoRA's importance averages): checkpointed with the model, never
    written to adapter files."""
    return {f"{module_name}.adapters.{name}.{buffer}"
            for module_name, _, adapter in handle.adapter_modules(name)
            for buffer in getattr(adapter, "training_state", ())}


def _copy_tensors(handle, directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    marks = [f".adapters.{name}.", f".copies.{name}."]
    state = {k: v for k, v in handle.model.state_dict(keep_vars=True).items() if any(m in k for m in marks)}
    theirs = {k: v for k, v in tensors.items() if any(m in k for m in marks)}
    missing = sorted(set(state) - set(theirs) - training_state_keys(handle, name))
    if missing:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: adapter {name!r} lacks tensors {missing[:4]} "
                              "that the model's adapter layers expect")
    for key, tensor in theirs.items():
        if key not in state:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensor {key!r} has no place in this model")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensor {key!r}: expected shape "
                                  f"{list(state[key].shape)} (from this model's layer), found "
                                  f"{list(tensor.shape)}: the adapter was made for a model with different "
                                  "layer sizes")
    with torch.no_grad():
        for key, tensor in theirs.items():
            state[key].copy_(tensor.to(state[key].dtype))
