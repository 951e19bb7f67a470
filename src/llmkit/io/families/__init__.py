"""One module per Hugging Face model family. Each module provides:

- `MODEL_TYPES`: the config.json `model_type` values it reads;
- `PREFIXES`: model prefixes legacy checkpoints may or may not carry (e.g. "transformer.");
- `TASKS`: llmkit task -> HF architecture class name written on export;
- `config_from_hf(hf_dict, source)` / `config_to_hf(config, task)`;
- `rules(config, task)`: the `Rule` list mapping every llmkit tensor to its HF name;
- `IGNORED`: regexes of HF tensors that carry no weights (cached masks, rotary tables).
"""
from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Optional

from ..errors import CheckpointError
from . import bart, bert, gpt2, llama

# Keyed by ModelConfig.family.
FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama, "mistral": llama, "bert": bert, "bart": bart}
_BY_MODEL_TYPE = {model_type: module for module in set(FAMILIES.values()) for model_type in module.MODEL_TYPES}


def family_for_model_type(model_type: Optional[str], source: Path) -> ModuleType:
    if model_type not in _BY_MODEL_TYPE:
        raise CheckpointError(f"{source}: key 'model_type': expected one of {sorted(_BY_MODEL_TYPE)}, "
                              f"found {model_type!r}")
    return _BY_MODEL_TYPE[model_type]


def task_from_architectures(architectures, mapping: dict[str, str], default: str, source: Path) -> str:
    """Pick the llmkit task from config.json's `architectures` (first known class wins)."""
    for name in architectures or []:
        if name in mapping:
            return mapping[name]
    if architectures:
        raise CheckpointError(f"{source}: key 'architectures': expected one of {sorted(mapping)}, "
                              f"found {architectures!r} (pass task=... to choose a head)")
    return default


def ignorable(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)
