"""Checkpoint formats: Hugging Face folders (config.json + safetensors) and llmkit's own, in and out."""
from .errors import CheckpointError
from .hf import load_hf, save_hf
from .native import is_llmkit_checkpoint, load_any, load_llmkit, save_llmkit

__all__ = ["CheckpointError", "load_hf", "save_hf", "load_llmkit", "save_llmkit", "load_any",
           "is_llmkit_checkpoint"]
