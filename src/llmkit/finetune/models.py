"""Models for fine-tuning: built from a checkpoint or a preset, with the task's head; saved and
loaded back.

- causal_lm: the checkpoint's CausalLM (`llmkit.load_any`), or a preset built from scratch.
- sequence_classification / token_classification: the checkpoint's transformer stack (any task:
  an HF BertModel, a CausalLM, ...) under a new SequenceClassifier / TokenClassifier head. A BERT
  checkpoint's pooler is kept and used (`pooling: auto`), as BertForSequenceClassification does.

Causal LMs are saved in Hugging Face format where the family has a layout (else llmkit's own).
Classifiers are saved as `llmkit_finetune.json` (task, labels, pooling, ModelConfig) plus
`model.safetensors` with llmkit's tensor names, written atomically; `load_finetuned` reads both kinds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union


from ..config import ConfigError, ModelConfig
from ..io import load_any, save_hf, save_llmkit
from ..io.errors import CheckpointError
from ..io.hf import expected_tensors
from ..io.native import load_tensors_into
from ..io.safetensors_files import atomic_write_text, read_json, write_tensors
from ..model import CausalLM, SequenceClassifier, TokenClassifier, build_model
from ..presets import get_preset
from ..pretrain import save_model
from ..recipes import RecipeError
from ..tokenizer import Tokenizer
from .recipe import ModelSection

HEAD_FILE = "llmkit_finetune.json"


def is_finetuned_checkpoint(path: Union[str, Path]) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


def _preset_config(section: ModelSection, tokenizer: Tokenizer) -> ModelConfig:
    fields = dict(section.config)
    fields.setdefault("vocab_size", tokenizer.vocab_size)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        return get_preset(section.preset, **fields)
    except (ConfigError, ValueError) as exc:
        raise RecipeError(f"model: {exc}") from exc


def _make_head(task: str, config: ModelConfig, n_labels: int, pooling: str, bert_pooler: bool):
    if task == "sequence_classification":
        return SequenceClassifier(config, n_labels, pooling=None if pooling in ("auto", "bert_pooler") else pooling,
                                  bert_pooler=bert_pooler)
    return TokenClassifier(config, n_labels)


def build_finetune_model(section: ModelSection, tokenizer: Tokenizer, n_labels: Optional[int] = None):
    """The model to fine-tune, with the head `section.task` needs (n_labels for classifiers)."""
    task = section.task
    if section.checkpoint is not None and is_finetuned_checkpoint(section.checkpoint):
        model, meta = load_finetuned(section.checkpoint)
        if meta["task"] != task or meta.get("n_labels") != n_labels:
            raise RecipeError(f"model.from={section.checkpoint!r} is a {meta['task']} model with "
                              f"{meta.get('n_labels')} labels: expected task {task!r} with {n_labels} labels")
        return model.train()
    if task == "causal_lm":
        if section.checkpoint is None:
            return build_model(_preset_config(section, tokenizer), "causal_lm")
        model = load_any(section.checkpoint)
        if not isinstance(model, CausalLM):
            raise RecipeError(f"model.from={section.checkpoint!r} holds a {type(model).__name__}: task causal_lm "
                              "needs a decoder (CausalLM) checkpoint")
        return model.train()
    backbone = (load_any(section.checkpoint) if section.checkpoint is not None
                else build_model(_preset_config(section, tokenizer)))
    if not hasattr(backbone, "transformer") or getattr(backbone.config, "is_encoder_decoder", False):
        raise RecipeError(f"model: {type(backbone).__name__} has no single transformer stack to put a "
                          f"{task} head on (encoder-decoder models are not supported here)")
    has_pooler = getattr(backbone, "pooler", None) is not None
    if section.pooling == "bert_pooler" and not has_pooler:
        raise RecipeError(f"model.pooling='bert_pooler': the checkpoint {section.checkpoint!r} has no pooler; "
                          "expected cls, mean or last")
    bert_pooler = task == "sequence_classification" and has_pooler and section.pooling in ("auto", "bert_pooler")
    model = _make_head(task, backbone.config, n_labels, section.pooling, bert_pooler)
    model.transformer.load_state_dict(backbone.transformer.state_dict())
    if bert_pooler:
        model.pooler.load_state_dict(backbone.pooler.state_dict())
    return model.train()


def save_finetuned(model, tokenizer: Tokenizer, directory: Union[str, Path], *, fmt: str = "auto",
                   labels: Optional[list] = None) -> Path:
    """Write the model and its tokenizer to `directory` (see the module docstring)."""
    directory = Path(directory)
    if isinstance(model, (SequenceClassifier, TokenClassifier)):
        if fmt == "hf":
            raise RecipeError(f"save='hf': llmkit has no Hugging Face layout for {type(model).__name__} yet; "
                              "expected save: llmkit (or auto)")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in expected_tensors(model).items()}
        write_tensors(tensors, directory, "2GB")
        task = "sequence_classification" if isinstance(model, SequenceClassifier) else "token_classification"
        n_labels = model.classifier.proj.out_features
        meta = {"format": "llmkit-finetune", "task": task, "n_labels": n_labels,
                "labels": list(labels) if labels is not None else [str(i) for i in range(n_labels)],
                "pooling": getattr(model, "pooling", None), "bert_pooler": getattr(model, "pooler", None) is not None,
                "config": model.config.to_dict()}
        atomic_write_text(directory / HEAD_FILE, json.dumps(meta, indent=2))
    elif fmt == "auto":
        save_model(model, tokenizer, directory)     # HF where the family has a layout, else llmkit's own
        return directory
    else:
        (save_hf if fmt == "hf" else save_llmkit)(model, directory)
    tokenizer.save(directory)
    return directory


def load_finetuned(path: Union[str, Path]):
    """(model, meta) from a folder written by save_finetuned (or any HF / llmkit checkpoint)."""
    directory = Path(path)
    if not is_finetuned_checkpoint(directory):
        model = load_any(directory)
        task = "causal_lm" if isinstance(model, CausalLM) else type(model).__name__
        return model, {"task": task}
    meta = read_json(directory / HEAD_FILE)
    if meta.get("format") != "llmkit-finetune" or meta.get("task") not in ("sequence_classification",
                                                                          "token_classification"):
        raise CheckpointError(f"{directory / HEAD_FILE}: expected format 'llmkit-finetune' with a classification "
                              f"task, found {meta.get('format')!r} / {meta.get('task')!r}")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (ConfigError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{directory / HEAD_FILE}: key 'config': {exc}") from exc
    model = _make_head(meta["task"], config, int(meta["n_labels"]), meta.get("pooling") or "auto",
                       bool(meta.get("bert_pooler")))
    load_tensors_into(model, directory)
    return model.eval(), meta
