"""One module per Hugging Face model family. Each module provides:

- `MODEL_TYPES`: the config.json `model_type` values it reads;
- `PREFIXES`: model prefixes legacy checkpoints may or may not carry (e.g. "transformer.");
- `TASKS`: llmkit task -> HF architecture class name written on export;
- `config_from_hf(hf_dict, source)` / `config_to_hf(config, task)`;
- `rules(config, task)`: the `Rule` list mapping every llmkit tensor to its HF name;
- `IGNORED`: regexes of HF tensors that carry no weights (cached masks, rotary tables);
- `task_from_architectures(architectures, source)` / `is_ignorable(name)`, made with `common`.
"""
from __future__ import annotations

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
