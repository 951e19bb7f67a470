"""llmkit: one PyTorch toolkit for the whole life of a language model."""
from .config import ConfigError, ModelConfig
from .model import (CausalLM, EncoderModel, KVCache, MaskedLM, ModelOutput, Seq2SeqLM, Transformer,
                    build_model)
from .presets import get_preset

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy imports keep `import llmkit` light and avoid import cycles between io and model.
    if name in ("load_hf", "save_hf"):
        from .io import hf
        return getattr(hf, name)
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer
        return load_tokenizer
    if name == "generate":
        from .generate import generate
        return generate
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")


__all__ = ["ConfigError", "ModelConfig", "CausalLM", "EncoderModel", "KVCache", "MaskedLM",
           "ModelOutput", "Seq2SeqLM", "Transformer", "build_model", "get_preset", "load_hf",
           "save_hf", "load_tokenizer", "generate"]
