"""The transformer core: attention, positions, norms, MLP, blocks, stacks, heads, task models."""
from .attention import Attention
from .block import Block
from .cache import KVCache
from .heads import ClassificationHead, MLMHead, Pooler, ProjectionHead, ValueHead, pool
from .models import (TASKS, CausalLM, EncoderModel, LlmkitModel, MaskedLM, ProjectionModel,
                     Seq2SeqLM, SequenceClassifier, TokenClassifier, ValueModel, build_model)
from .slots import AdapterSite, AdapterSlot
from .transformer import EncoderDecoder, ModelOutput, Transformer

__all__ = [
    "Attention", "Block", "KVCache", "ClassificationHead", "MLMHead", "Pooler", "ProjectionHead",
    "ValueHead", "pool", "TASKS", "CausalLM", "EncoderModel", "LlmkitModel", "MaskedLM",
    "ProjectionModel", "Seq2SeqLM", "SequenceClassifier", "TokenClassifier", "ValueModel",
    "build_model", "EncoderDecoder", "ModelOutput", "Transformer", "AdapterSite", "AdapterSlot",
]
