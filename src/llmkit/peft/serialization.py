"""Adapter files, below the handle: `AdapterRecord` (one adapter as plain data) and the llmkit
codec, `read(directory) -> records` / `write(directory, records)`; peft_format.py is the HF one.

format="llmkit": adapter_config.json {"format": "llmkit", "adapters": {name: {method, config,
targets, modules_to_save, rank_pattern}}, "active": [...]} and adapter_model.safetensors holding
every tensor under its llmkit state-dict key: `<site>.adapters.<name>.<tensor>` for the adapter of a
wrapped layer or a filled slot (LoRA's factors, AdaLoRA's rank mask, LoRA-FA's frozen A),
`<module>.copies.<name>.<tensor>` for a trained head. Every method, every adapter, exactly.
Files are written to a temporary name and renamed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch

from ..io.errors import CheckpointError
from ..io.safetensors_files import atomic_save_tensors, atomic_write_text, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
Tensors = dict[str, torch.Tensor]


@dataclass
class AdapterRecord:
    name: str
    method: str
    config: dict                                            # the method config's fields
    targets: dict[str, Tensors]                             # site module -> its adapter's tensors
    saved: dict[str, Tensors] = field(default_factory=dict)       # modules_to_save -> the trained copy's
    rank_pattern: dict[str, int] = field(default_factory=dict)    # site -> rank, where not config["r"]
    active: bool = True
    base: dict[str, Tensors] = field(default_factory=dict)        # base layers to overwrite (peft's
                                                                  # save_embedding_layers)


def read_config(directory: Union[str, Path]) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    return read_json(directory / CONFIG_FILE)


def read_files(directory: Union[str, Path]) -> tuple[dict, Tensors]:
    from safetensors.torch import load_file
    config, weights = read_config(directory), Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: file not found (expected the adapter's safetensors)")
    return config, load_file(str(weights))


def write_files(directory: Union[str, Path], config: dict, tensors: Tensors) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, directory / WEIGHTS_FILE)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    return directory


def write(directory: Union[str, Path], records: list[AdapterRecord]) -> Path:
    tensors, entries = {}, {}
    for record in records:
        for store, sites in ((".adapters.", record.targets), (".copies.", record.saved)):
            for site, own in sites.items():
                tensors.update({f"{site}{store}{record.name}.{key}": t for key, t in own.items()})
        entries[record.name] = {"method": record.method, "config": record.config, "targets": list(record.targets),
                                "modules_to_save": list(record.saved), "rank_pattern": record.rank_pattern}
    meta = {"format": "llmkit", "adapters": entries, "active": [r.name for r in records if r.active]}
    return write_files(directory, meta, tensors)


def read(directory: Union[str, Path]) -> list[AdapterRecord]:
    meta, tensors = read_files(directory)
    if meta.get("format") != "llmkit":
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: expected a 'peft_type' (HF PEFT) or "
                              f"'format': 'llmkit' key, found keys {sorted(meta)}")
    claimed, records = set(), []

    def own(store: str, sites: list[str], name: str) -> dict[str, Tensors]:
        out = {site: {k[len(f"{site}{store}{name}."):]: t for k, t in tensors.items()
                      if k.startswith(f"{site}{store}{name}.")} for site in sites}
        claimed.update(f"{site}{store}{name}.{k}" for site, ts in out.items() for k in ts)
        return out
    for name, entry in (meta.get("adapters") or {}).items():
        records.append(AdapterRecord(name, entry["method"], dict(entry["config"]),
                                     own(".adapters.", entry["targets"], name),
                                     own(".copies.", entry.get("modules_to_save") or [], name),
                                     dict(entry.get("rank_pattern") or {}), name in meta.get("active", [])))
    stray = sorted(set(tensors) - claimed)
    if stray:
        raise CheckpointError(f"{Path(directory) / WEIGHTS_FILE}: tensors {stray[:4]} belong to no adapter "
                              f"of {CONFIG_FILE}")
    return records
