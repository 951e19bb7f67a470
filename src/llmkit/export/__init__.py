"""Export to other runtimes' file formats: GGUF for llama.cpp (`export_gguf`, `llmkit export gguf`).

Names are imported lazily, so `import llmkit.export` costs nothing (not even numpy) until one is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "export_gguf": "gguf", "GGUF_TYPES": "gguf", "gguf_bits_per_weight": "gguf",
    "ExportGGUFRecipe": "job", "run_export_gguf": "job",
    "ExportError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmkit.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
