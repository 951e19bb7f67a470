"""Helpers the family modules share."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError


def task_picker(mapping: dict[str, str], default: str):
    """A family's `task_from_architectures(architectures, source)`: the task of the first known class
    in config.json's `architectures` (none listed: `default`)."""
    def task_from_architectures(architectures, source: Path) -> str:
        for name in architectures or []:
            if name in mapping:
                return mapping[name]
        if architectures:
            raise CheckpointError(f"{source}: key 'architectures': expected one of {sorted(mapping)}, "
                                  f"found {architectures!r} (pass task=... to choose a head)")
        return default
    return task_from_architectures


def ignorer(patterns: tuple[str, ...]):
    """A family's `is_ignorable(name)`: whether an HF tensor name matches one of `patterns`."""
    return lambda name: any(re.search(p, name) for p in patterns)


def expect(hf: dict, layout: dict, source: Path, why: str) -> None:
    """Keys of config.json that, where given, must hold the one value llmkit builds."""
    for key, expected in layout.items():
        if hf.get(key) is not None and hf[key] != expected:
            raise CheckpointError(f"{source}: key {key!r}: expected {expected!r} ({why}), found {hf[key]!r}")
