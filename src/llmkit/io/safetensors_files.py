"""Reading and writing the safetensors files of a Hugging Face checkpoint folder.

Layouts: a single `model.safetensors`, or shards `model-0000i-of-0000N.safetensors` listed in
`model.safetensors.index.json` ({"metadata": {"total_size": ...}, "weight_map": {key: file}}).
Pickled `pytorch_model.bin` files are refused: they can run code when loaded.
Writes go to a temporary name and are renamed, so a crash never leaves a torn file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_MAGIC_MAX_HEADER = 100 * 1024 * 1024


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: key 'weight_map': expected a dict of tensor -> file, "
                                  f"found {type(weight_map).__name__}")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    found = f"found only {pickles}" if pickles else f"found {sorted(p.name for p in directory.iterdir())}"
    raise CheckpointError(f"{directory}: expected {SINGLE_FILE} or {INDEX_FILE} (safetensors); {found}. "
                          "Pickled weights are not loaded: convert them to safetensors first.")


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc


def read_tensors(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Load every tensor listed in `files` (name -> file), opening each file once."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    tensors = {}
    for path, names in by_file.items():
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                available = set(handle.keys())
                for name in names:
                    if name not in available:
                        raise CheckpointError(f"{path}: tensor {name!r} listed in the index is not in the file")
                    tensors[name] = handle.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc
    return tensors


def parse_size(size: int | str) -> int:
    """'2GB' / '500MB' / 1024 -> bytes."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '2GB'")


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str) -> list[str]:
    """Write one file, or shards plus an index when the total exceeds `max_shard_size`."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        atomic_save_tensors(shards[0], directory / SINGLE_FILE)
        written = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for shard, file in zip(shards, names):
            atomic_save_tensors(shard, directory / file)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: file for shard, file in zip(shards, names) for key in shard}}
        atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2))
        written = names + [INDEX_FILE]
    _remove_stale(directory, keep=set(written))
    return written


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """A previous export with another shard count must not leave files that confuse readers.
    Runs after the new files are complete, so a crash never leaves the folder without weights."""
    stale: Iterable[Path] = list(directory.glob("model-*-of-*.safetensors")) + [
        directory / INDEX_FILE, directory / SINGLE_FILE]
    for path in stale:
        if path.name not in keep and path.exists():
            path.unlink()
