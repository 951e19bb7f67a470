"""The one save / load of what a job trains: model, tokenizer, task head, adapter, and a manifest.

    llmkit_artifacts.json  {"format": "llmkit-artifacts", "job": "finetune", "weights": "hf",
                            "task": "causal_lm", "labels": null, "head": null, "adapter": "../adapter"}

weights: "hf" (config.json + model.safetensors that transformers reads), "llmkit" (llmkit_config.json:
layouts no HF class holds), "head" (a task head no HF layout holds - classifiers, reward models:
llmkit's tensor names, with the ModelConfig and head options in the manifest) or "own" (a model
that saves itself, e.g. the multimodal encoder). `adapter` is the folder of the PEFT adapter the
merged weights came from, relative to the model folder. Adapters that cannot merge (prompts,
prefixes, bottleneck adapters) leave the base weights and `"adapter_merged": false`; loading then
attaches the adapter again. A folder with no manifest (any HF or llmkit checkpoint, or a quantized
folder of compress.save_quantized) loads as it is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from torch import nn

from ..config import ConfigError, ModelConfig
from ..io import load_any, save_hf, save_llmkit
from ..io.errors import CheckpointError
from ..io.hf import expected_tensors
from ..io.native import load_tensors_into
from ..io.safetensors_files import atomic_write_text, read_json, write_tensors
from ..model import SequenceClassifier, TokenClassifier, ValueModel
from ..recipes import RecipeError
from ..tokenizer import Tokenizer, load_tokenizer

MANIFEST = "llmkit_artifacts.json"
FORMAT = "llmkit-artifacts"
SAVE_FORMATS = ("auto", "hf", "llmkit")

# Heads no Hugging Face layout holds: kind -> (class, options of a model, model from config + options).
HEADS: dict[str, tuple[type, Callable[[nn.Module], dict], Callable[[ModelConfig, dict], nn.Module]]] = {
    "sequence_classification": (
        SequenceClassifier,
        lambda m: {"n_labels": m.classifier.proj.out_features, "pooling": getattr(m, "pooling", None),
                   "bert_pooler": getattr(m, "pooler", None) is not None},
        lambda c, o: SequenceClassifier(c, int(o["n_labels"]), pooling=o.get("pooling"),
                                        bert_pooler=bool(o.get("bert_pooler")))),
    "token_classification": (TokenClassifier, lambda m: {"n_labels": m.classifier.proj.out_features},
                             lambda c, o: TokenClassifier(c, int(o["n_labels"]))),
    "reward": (ValueModel, lambda m: {}, lambda c, o: ValueModel(c)),
}


@dataclass
class Artifacts:
    model: nn.Module
    tokenizer: Tokenizer
    manifest: dict

    @property
    def task(self) -> Optional[str]:
        return self.manifest.get("task")


def head_kind(model: nn.Module) -> Optional[str]:
    return next((kind for kind, (cls, _, _) in HEADS.items() if isinstance(model, cls)), None)


def save_artifacts(directory: Union[str, Path], model: nn.Module, tokenizer: Tokenizer, *, job: str,
                   task: Optional[str] = None, labels: Optional[list] = None, fmt: str = "auto", handle=None,
                   adapter_dir: Union[str, Path, None] = None) -> nn.Module:
    """Write the trained model (merged, when `handle` holds PEFT adapters: the adapter alone goes to
    `adapter_dir`, default <directory>/adapter) with its tokenizer and manifest; returns the model."""
    if fmt not in SAVE_FORMATS:
        raise RecipeError(f"save={fmt!r}: expected one of {list(SAVE_FORMATS)}")
    directory = Path(directory)
    manifest = {"format": FORMAT, "job": job, "task": task, "labels": list(labels) if labels else None,
                "head": None, "adapter": None}
    if handle is not None:
        adapter_dir = Path(adapter_dir) if adapter_dir is not None else directory / "adapter"
        handle.save(adapter_dir, format="llmkit")
        manifest["adapter"] = os.path.relpath(adapter_dir, directory)
        if not handle.mergeable():        # prompts, prefixes, bottlenecks: base weights + the adapter
            manifest["adapter_merged"] = False
            with handle.detached() as base:
                _write_model(directory, base, fmt, manifest)
            tokenizer.save(directory)
            atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
            return model
        model = handle.merge_and_unload()
    _write_model(directory, model, fmt, manifest)
    tokenizer.save(directory)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
    return model


def _write_model(directory: Path, model: nn.Module, fmt: str, manifest: dict) -> None:
    """The weights, in the layout `fmt` asks for; records which one in manifest["weights"]."""
    kind = head_kind(model)
    if kind is not None:
        if fmt == "hf":
            raise RecipeError(f"save='hf': no Hugging Face layout holds {type(model).__name__}; expected "
                              "save: llmkit (or auto)")
        directory.mkdir(parents=True, exist_ok=True)
        write_tensors({k: t.detach().to("cpu").contiguous() for k, t in expected_tensors(model).items()},
                      directory, "2GB")
        manifest.update(weights="head", head={"kind": kind, **HEADS[kind][1](model)}, config=model.config.to_dict())
    elif hasattr(model, "save"):                  # a model of an objective's own (multimodal)
        model.save(directory)
        manifest["weights"] = "own"
    elif fmt == "llmkit":
        save_llmkit(model, directory)
        manifest["weights"] = "llmkit"
    else:
        try:
            save_hf(model, directory)
            manifest["weights"] = "hf"
        except CheckpointError:
            if fmt == "hf":
                raise
            save_llmkit(model, directory)         # a layout no HF family holds
            manifest["weights"] = "llmkit"


def load_artifacts(directory: Union[str, Path]) -> Artifacts:
    """The model (in eval mode), tokenizer and manifest of a folder save_artifacts wrote, or of any
    HF / llmkit checkpoint (manifest {"task": <its llmkit task>})."""
    from ..io.hf import task_of
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such folder (expected a checkpoint: config.json or {MANIFEST})")
    manifest = read_json(directory / MANIFEST) if (directory / MANIFEST).is_file() else {}
    if manifest and manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory / MANIFEST}: key 'format': expected {FORMAT!r}, "
                              f"found {manifest.get('format')!r}")
    head = manifest.get("head")
    if head is not None:
        if head.get("kind") not in HEADS:
            raise CheckpointError(f"{directory / MANIFEST}: key 'head.kind': expected one of {sorted(HEADS)}, "
                                  f"found {head.get('kind')!r}")
        try:
            config = ModelConfig.from_dict(manifest["config"])
        except (ConfigError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{directory / MANIFEST}: key 'config': {exc}") from exc
        model = HEADS[head["kind"]][2](config, head)
        load_tensors_into(model, directory)
    else:
        from ..compress.storage import is_quantized_dir, load_quantized
        model = load_quantized(directory) if is_quantized_dir(directory) else load_any(directory)
        manifest.setdefault("task", task_of(model))
    if manifest.get("adapter") and manifest.get("adapter_merged") is False:
        from .. import peft
        peft.load(model, directory / manifest["adapter"])      # the weights are the base: attach it
    return Artifacts(model.eval(), load_tokenizer(directory), manifest)
