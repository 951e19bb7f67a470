"""Export to other runtimes' file formats: GGUF for llama.cpp (`export_gguf`, `llmkit export gguf`).

The `gguf` package is imported by the functions that use it, so `llmkit --help` does not load it.
"""
from __future__ import annotations

from .errors import ExportError
from .gguf import GGUF_TYPES, export_gguf, gguf_bits_per_weight
from .job import ExportGGUFRecipe, run_export_gguf

__all__ = ["ExportError", "ExportGGUFRecipe", "GGUF_TYPES", "export_gguf", "gguf_bits_per_weight", "run_export_gguf"]
