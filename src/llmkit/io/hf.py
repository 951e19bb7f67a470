"""`load_hf(dir)` and `save_hf(model, dir)`: Hugging Face checkpoints in and out.

A checkpoint folder holds config.json and model.safetensors (or shards plus an index). Each
family module in `families/` knows its config fields and its tensor names (`Rule`s). Loading
checks every tensor's presence and shape *before* copying anything, so a bad checkpoint raises
a `CheckpointError` and never leaves a half-loaded model.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from ..model import TASKS, LlmkitModel, build_model
from .errors import CheckpointError
from .families import FAMILIES, family_for_model_type
from .rules import normalize_key
from .safetensors_files import atomic_write_text, read_json, read_tensors, weight_files, write_tensors

PathLike = Union[str, Path]


def expected_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (a tied one only under its first name) and persistent buffers."""
    tensors = dict(model.named_parameters())
    non_persistent = {f"{name}.{b}" if name else b
                      for name, module in model.named_modules()
                      for b in module._non_persistent_buffers_set}
    tensors.update({n: b for n, b in model.named_buffers() if n not in non_persistent})
    return tensors


def load_hf(path: PathLike, *, task: Optional[str] = None, dtype: Union[torch.dtype, str, None] = None,
            device: Union[str, torch.device] = "cpu") -> LlmkitModel:
    """Build the llmkit model a Hugging Face checkpoint folder describes, with its weights.

    task: override the head chosen from `architectures` (see `llmkit.model.TASKS`).
    dtype: None -> float32; "auto" -> the checkpoint's dtype; or a torch dtype.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a folder with config.json)")
    config_path = directory / "config.json"
    hf_config = read_json(config_path)
    family = family_for_model_type(hf_config.get("model_type"), config_path)
    config = family.config_from_hf(hf_config, config_path)
    task = task or family.task_from_architectures(hf_config.get("architectures"), config_path)
    if task not in family.TASKS:
        raise CheckpointError(f"{config_path}: task {task!r} is not available for "
                              f"model_type {hf_config['model_type']!r}; expected one of {sorted(family.TASKS)}")

    files = weight_files(directory)
    by_name = {normalize_key(name, family.PREFIXES): name for name in files}
    model = build_model(config, task)
    wanted = expected_tensors(model)
    rules = [r for r in family.rules(config, task) if r.ours in wanted]
    _check_rules_cover(rules, wanted)

    # Read only the tensors the rules need, then check all of them before copying any.
    needed = {}
    for rule in rules:
        name = by_name.get(normalize_key(rule.theirs, family.PREFIXES))
        if name is None:
            raise CheckpointError(f"{_where(directory, files, None)}: tensor {rule.theirs!r} is missing "
                                  f"(expected shape {list(rule.hf_shape(tuple(wanted[rule.ours].shape)))})")
        needed[name] = files[name]
    raw = read_tensors(needed)
    state = {}
    for rule in rules:
        name = by_name[normalize_key(rule.theirs, family.PREFIXES)]
        tensor = raw[name]
        want = rule.hf_shape(tuple(wanted[rule.ours].shape))
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{_where(directory, files, name)}: tensor {name!r}: expected shape "
                                  f"{list(want)}, found {list(tensor.shape)}")
        state[rule.ours] = rule.to_ours(tensor)

    unused = sorted(n for n in files if n not in needed and not family.is_ignorable(n))
    if unused:
        warnings.warn(f"{directory}: {len(unused)} tensors not used by {type(model).__name__}: "
                      f"{unused[:5]}{' ...' if len(unused) > 5 else ''}")

    target_dtype = _resolve_dtype(dtype, state)
    with torch.no_grad():
        for key, tensor in state.items():
            wanted[key].copy_(tensor.to(wanted[key].dtype))
    model.tie_weights()
    return model.to(device=device, dtype=target_dtype).eval()


def save_hf(model: LlmkitModel, path: PathLike, *, max_shard_size: Union[int, str] = "2GB",
            dtype: Optional[torch.dtype] = None) -> Path:
    """Write config.json and model.safetensors (sharded past `max_shard_size`) that transformers'
    `from_pretrained` reads. Tied weights are omitted, as transformers does."""
    config = model.config
    if config.family not in FAMILIES:
        raise CheckpointError(f"ModelConfig.family={config.family!r}: expected one of {sorted(FAMILIES)} "
                              "to export in Hugging Face format")
    family = FAMILIES[config.family]
    task = task_of(model)
    if task not in family.TASKS:
        raise CheckpointError(f"{type(model).__name__} (task {task!r}) has no Hugging Face layout for "
                              f"family {config.family!r}; expected one of {sorted(family.TASKS)}")
    for name, want in getattr(family, "LAYOUT", {}).items():
        if getattr(config, name) != want:
            raise CheckpointError(f"ModelConfig.{name}={getattr(config, name)!r}: the {config.family} layout "
                                  f"expects {want!r}; export this model under another family")
    wanted = expected_tensors(model)
    rules = [r for r in family.rules(config, task) if r.ours in wanted]
    _check_rules_cover(rules, wanted)
    grouped: dict[str, list] = {}
    for rule in rules:
        tensor = wanted[rule.ours].detach().to("cpu")
        grouped.setdefault(rule.theirs, []).append((rule, tensor.to(dtype) if dtype else tensor))
    tensors = {name: type(rules[0]).to_theirs(parts).clone() for name, parts in grouped.items()}

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = family.config_to_hf(config, task)
    stored = dtype or next(iter(tensors.values())).dtype
    hf_config["dtype"] = hf_config["torch_dtype"] = str(stored).replace("torch.", "")
    write_tensors(tensors, directory, max_shard_size)
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2, sort_keys=True))
    return directory


def task_of(model: LlmkitModel) -> str:
    for task, builder in TASKS.items():
        if isinstance(builder, type) and isinstance(model, builder):  # FSDP2 subclasses it
            if task == "masked_lm" and getattr(model, "nsp_head", None) is not None:
                return "pretraining"
            return task
    raise CheckpointError(f"{type(model).__name__}: expected one of {sorted(TASKS)} models for export")


def _check_rules_cover(rules, wanted) -> None:
    covered = {r.ours for r in rules}
    missing = [k for k in wanted if k not in covered]
    if missing:  # a converter bug, not a user error: say exactly what is unmapped
        raise NotImplementedError(f"no Hugging Face name for llmkit tensors {missing[:5]}")


def _where(directory: Path, files: dict, name: Optional[str]) -> Path:
    if name is not None:
        return files[name]
    unique = set(files.values())
    return next(iter(unique)) if len(unique) == 1 else directory


def _resolve_dtype(dtype, state) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return next(t.dtype for t in state.values() if t.is_floating_point())
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype
