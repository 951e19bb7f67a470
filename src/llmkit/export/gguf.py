"""GGUF export for llama.cpp (work in progress)."""
from __future__ import annotations

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
