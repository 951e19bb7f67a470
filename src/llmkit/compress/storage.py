"""Quantized model folders: save_quantized / load_quantized / is_quantized_dir.

    quantization_config.json  {"format": "llmkit-quantized", "version": 1, "task": "causal_lm",
                               "config": {...ModelConfig...},
                               "quantization": {"scheme", "bits", "group_size", "symmetric", "method",
                                                "double_quant", "modules",
                                                "layers": {path: {"scheme", "group_size", "symmetric",
                                                                  "double_quant", "bias"}}}}
    config.json               the Hugging Face config of the family (when it has one), with a
                              "quantization_config" entry ({"quant_method": "llmkit", ...}) as HF
                              quantized checkpoints carry
    model.safetensors         every persistent tensor under llmkit's names: the QuantLinear buffers
                              as stored (packed codes, scales, zeros / absmax) and the rest in fp32
    tokenizer files           when a tokenizer is given

Loading rebuilds the model from the ModelConfig, puts an empty QuantLinear of each layer's spec
in place of every quantized Linear and copies the stored tensors in (shapes checked before any
copy): nothing is quantized again, so logits are bitwise those of the saved model. The folder is
written to a temporary sibling and renamed into place, so a crash never leaves half a folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..config import ConfigError, ModelConfig
from ..io.errors import CheckpointError
from ..io.families import FAMILIES
from ..io.hf import expected_tensors, task_of
from ..io.native import load_tensors_into
from ..io.safetensors_files import atomic_write_text, read_json, write_tensors
from ..model import build_model
from .quantization import QuantLinear, replace_module

QUANT_FILE = "quantization_config.json"
FORMAT = "llmkit-quantized"
VERSION = 1

PathLike = Union[str, Path]


def is_quantized_dir(directory: PathLike) -> bool:
    """Whether `directory` is a folder save_quantized wrote."""
    path = Path(directory) / QUANT_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def layer_spec(layer: QuantLinear) -> dict:
    return {"scheme": layer.scheme, "group_size": layer.group_size, "symmetric": layer.symmetric,
            "double_quant": layer.double_quant, "bias": layer.bias is not None}


def hf_config(model: nn.Module, task: str) -> Optional[dict]:
    """The family's HF config.json, or None where no HF layout holds this model."""
    config = model.config
    family = FAMILIES.get(config.family)
    if family is None or task not in family.TASKS or any(
            getattr(config, name) != want for name, want in getattr(family, "LAYOUT", {}).items()):
        return None
    return family.config_to_hf(config, task)


def save_quantized(model: nn.Module, directory: PathLike, tokenizer=None, *,
                   max_shard_size: Union[int, str] = "2GB") -> Path:
    """Write a quantized model (and its tokenizer) to `directory`; returns the folder."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise CheckpointError("save_quantized: the model has no QuantLinear layer: expected a model "
                              "llmkit.compress.quantize() changed (save a plain model with save_hf)")
    task = task_of(model)
    quant = dict(getattr(model, "quantization_config", {}) or {})
    quant.setdefault("modules", list(layers))
    quant["layers"] = {path: layer_spec(m) for path, m in layers.items()}
    meta = {"format": FORMAT, "version": VERSION, "task": task, "config": model.config.to_dict(),
            "quantization": quant}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in expected_tensors(model).items()}

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_tensors(tensors, tmp, max_shard_size)
        hf = hf_config(model, task)
        if hf is not None:
            summary = {k: v for k, v in quant.items() if k != "layers"}
            hf["quantization_config"] = {"quant_method": "llmkit", **summary}
            atomic_write_text(tmp / "config.json", json.dumps(hf, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(tmp)
        atomic_write_text(tmp / QUANT_FILE, json.dumps(meta, indent=2))
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` folder to `target`; an existing target is moved aside first and
    removed only once the new folder is in place."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def load_quantized(directory: PathLike) -> nn.Module:
    """The quantized model (eval mode) of a folder save_quantized wrote."""
    directory = Path(directory)
    path = directory / QUANT_FILE
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: key 'format': expected {FORMAT!r}, found {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: key 'version': expected {VERSION}, found {meta.get('version')!r}")
    try:
        config = ModelConfig.from_dict(meta.get("config", {}))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: key 'config': {exc}") from exc
    quant = meta.get("quantization") or {}
    layers = quant.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{path}: key 'quantization.layers': expected a dict of layer path -> spec")
    model = build_model(config, meta.get("task"))
    modules = dict(model.named_modules())
    for layer_path, spec in layers.items():
        linear = modules.get(layer_path)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{path}: key 'quantization.layers.{layer_path}': expected the path of an "
                                  f"nn.Linear of the model, found {type(linear).__name__}")
        try:
            layer = QuantLinear(linear.in_features, linear.out_features, scheme=spec["scheme"],
                                group_size=spec["group_size"], symmetric=spec["symmetric"],
                                double_quant=spec["double_quant"], bias=spec["bias"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: key 'quantization.layers.{layer_path}': {exc}") from exc
        replace_module(model, layer_path, layer)
    load_tensors_into(model, directory)
    model.quantization_config = {k: v for k, v in quant.items() if k != "layers"}
    return model.eval()
