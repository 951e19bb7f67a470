"""llmkit: one PyTorch toolkit for the whole life of a language model."""
from .config import ConfigError, ModelConfig
from .generation import SamplingParams, generate, stream_generate
from .io import CheckpointError, load_hf, save_hf
from .model import (CausalLM, EncoderModel, KVCache, MaskedLM, ModelOutput, Seq2SeqLM, Transformer,
                    build_model)
from .presets import get_preset
from .tokenizer import Tokenizer, load_tokenizer
from . import peft  # noqa: E402  (llmkit.peft.apply after a plain `import llmkit`)

__version__ = "0.1.0"


__all__ = ["ConfigError", "ModelConfig", "CausalLM", "EncoderModel", "KVCache", "MaskedLM",
           "ModelOutput", "Seq2SeqLM", "Transformer", "build_model", "get_preset", "load_hf",
           "save_hf", "CheckpointError", "Tokenizer", "load_tokenizer", "generate",
           "stream_generate", "SamplingParams"]
