"""The one error type of llmkit.export: it names the field, the value and what was expected."""
from __future__ import annotations


class ExportError(ValueError):
    """A model, tokenizer or option that the target format (llama.cpp's GGUF) cannot represent."""
