"""Model compression: weight-only quantization (int8, int4, NF4; RTN or GPTQ), pruning (magnitude,
Wanda, SparseGPT; unstructured or N:M; structured heads and FFN channels) and the quality protocols
(perplexity and llama.cpp-style KL divergence) that measure the damage.

Names are imported lazily, so `import llmkit.compress` costs nothing until a name is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # formats
    "NF4_CODE": "nf4", "NF4Tensor": "nf4", "quantize_nf4": "nf4",
    "IntQuantized": "intq", "quantize_int": "intq",
    # model-level quantization and its storage
    "QuantLinear": "quantization", "quantize": "quantization", "SCHEMES": "quantization",
    "save_quantized": "storage", "load_quantized": "storage", "is_quantized_dir": "storage",
    # GPTQ and pruning
    "gptq_quantize_layer": "gptq", "sparsegpt_prune_layer": "sparsegpt",
    "prune": "pruning", "PRUNE_METHODS": "pruning",
    "prune_ffn_channels": "structured", "prune_attention_heads": "structured",
    # quality
    "perplexity": "quality", "kl_divergence": "quality",
    # errors
    "CompressError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmkit.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
