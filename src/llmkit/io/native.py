"""llmkit's own checkpoint folder: `llmkit_config.json` + `model.safetensors` with llmkit's names.

It holds any model llmkit can build, including configurations no Hugging Face layout can express
(e.g. ALiBi with a bias-free LayerNorm). Tied tensors are stored once; loading re-ties them.

    {"format": "llmkit", "task": "causal_lm", "config": {...ModelConfig...}}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..config import ConfigError, ModelConfig
from ..model import LlmkitModel, build_model
from .errors import CheckpointError
from .hf import expected_tensors, task_of
from .safetensors_files import atomic_write_text, read_json, read_tensors, weight_files, write_tensors

CONFIG_FILE = "llmkit_config.json"


def is_llmkit_checkpoint(path: Union[str, Path]) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_llmkit(model: LlmkitModel, path: Union[str, Path], *, max_shard_size: Union[int, str] = "2GB") -> Path:
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in expected_tensors(model).items()}
    write_tensors(tensors, directory, max_shard_size)
    meta = {"format": "llmkit", "task": task_of(model), "config": model.config.to_dict()}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2))
    return directory


def load_llmkit(path: Union[str, Path], *, dtype: Optional[torch.dtype] = None,
                device: Union[str, torch.device] = "cpu") -> LlmkitModel:
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    meta = read_json(config_path)
    if meta.get("format") != "llmkit":
        raise CheckpointError(f"{config_path}: key 'format': expected 'llmkit', found {meta.get('format')!r}")
    try:
        config = ModelConfig.from_dict(meta.get("config", {}))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: key 'config': {exc}") from exc
    model = build_model(config, meta.get("task"))
    load_tensors_into(model, directory)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def load_tensors_into(model: LlmkitModel, directory: Path) -> None:
    """Copy the safetensors weights of `directory` into `model`, checking every tensor's presence and
    shape before copying anything (a bad file leaves the model untouched); then re-tie weights."""
    wanted = expected_tensors(model)
    files = weight_files(directory)
    for name, tensor in wanted.items():
        if name not in files:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing (expected shape {list(tensor.shape)})")
    stored = read_tensors({name: files[name] for name in wanted})
    for name, tensor in stored.items():
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise CheckpointError(f"{files[name]}: tensor {name!r}: expected shape {list(wanted[name].shape)}, "
                                  f"found {list(tensor.shape)}")
    with torch.no_grad():
        for name, tensor in stored.items():
            wanted[name].copy_(tensor)
    model.tie_weights()


def load_any(path: Union[str, Path], **kwargs) -> LlmkitModel:
    """A Hugging Face folder (config.json) or an llmkit folder (llmkit_config.json)."""
    from .hf import load_hf
    return load_llmkit(path, **kwargs) if is_llmkit_checkpoint(path) else load_hf(path, **kwargs)
