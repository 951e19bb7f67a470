"""Checkpoint formats: Hugging Face folders (config.json + safetensors) in and out."""
from .errors import CheckpointError
from .hf import load_hf, save_hf

__all__ = ["CheckpointError", "load_hf", "save_hf"]
