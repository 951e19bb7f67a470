"""Saving and loading a handle's adapters through the codecs: the format choice, a LoRA view of
any layer method and a folded view of the prompt methods for HF peft files, the HF module names
and model layout the peft codecs are given as data, and the one shape-checked copy every loaded
tensor goes through. Works on the handle it is given (it never imports handle.py);
`PeftHandle.record` / `.attach` are the two ends.

format="peft" (and reading a peft directory) takes LoRA-shaped layer methods (peft_format.py) and
prompt_tuning, prefix_tuning, p_tuning_v2, ia3 (peft_prompt_format.py: PROMPT_TUNING,
PREFIX_TUNING, IA3). The task type is the model class's: CausalLM -> CAUSAL_LM,
SequenceClassifier -> SEQ_CLS (a BERT classifier's head maps to transformers' `classifier`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..io.errors import CheckpointError
from ..io.rules import Rule
from ..model import CausalLM, Seq2SeqLM, SequenceClassifier, TokenClassifier
from . import peft_format, peft_prompt_format, serialization
from .errors import PeftError
from .prefix import kv_shape
from .registry import get_method
from .serialization import AdapterRecord
from .targets import visible_modules

FORMATS = ("llmkit", "peft")
PEFT_TYPES = ("LORA", *peft_prompt_format.PEFT_TYPES)          # what a peft directory may hold
TASK_TYPES = ((CausalLM, "CAUSAL_LM"), (SequenceClassifier, "SEQ_CLS"), (Seq2SeqLM, "SEQ_2_SEQ_LM"),
              (TokenClassifier, "TOKEN_CLS"))
# A SequenceClassifier's head as transformers names it, per family (the body keeps the LM's names).
CLASSIFIER_HEADS = {"bert": (("classifier.proj.weight", "classifier.weight"),
                              ("classifier.proj.bias", "classifier.bias"))}


def save(handle, directory, format: str = "llmkit", adapter_name: Optional[str] = None) -> Path:
    """format="llmkit": every adapter (or `adapter_name`) of any method, exactly; "peft": one
    adapter as HF PEFT files (LORA for the layer methods; PROMPT_TUNING, PREFIX_TUNING, IA3)."""
    if format not in FORMATS:
        raise PeftError(f"format={format!r}: expected one of {list(FORMATS)}")
    if not handle.adapters:
        raise PeftError("save: the handle has no adapter (merge_and_unload() spends it)")
    if adapter_name is not None and adapter_name not in handle.adapters:
        raise PeftError(f"adapter_name={adapter_name!r}: expected one of {list(handle.adapters)}")
    if format == "llmkit":
        return serialization.write(directory, [handle.record(n) for n in ([adapter_name] if adapter_name
                                                                            else handle.adapters)])
    name = adapter_name or (handle.active[0] if len(handle.active) == 1 else None)
    if name is None:
        raise PeftError(f"save(format='peft') writes one adapter: pass adapter_name= one of {list(handle.adapters)}")
    if handle.adapters[name].method in peft_prompt_format.METHODS:
        return peft_prompt_format.write(directory, folded_record(handle, name), peft_layout(handle.model),
                                        hf_rules(handle.model))
    return peft_format.write(directory, [lora_record(handle, name)], hf_rules(handle.model),
                             {n for n, layer in handle.layers() if layer.is_embedding})


def folded_record(handle, name: str) -> AdapterRecord:
    """Adapter `name` of a prompt method as HF peft keeps it: a prefix as its inference form
    (prefix tuning's P = MLP(E) computed once), the config still saying how it trained."""
    record, info = handle.record(name), handle.adapters[name]
    if info.method not in ("prefix_tuning", "p_tuning_v2"):
        return record
    targets = {t: {"prefix": handle.model.get_submodule(t).named[name].inference_prefix().float().cpu()}
               for t in info.targets}
    return dataclasses.replace(record, targets=targets)


def lora_record(handle, name: str) -> AdapterRecord:
    """Adapter `name` as a LoRA record: a plain LoRA's own factors, else ΔW = B' A' with the
    method's scale folded into B'."""
    record, info = handle.record(name), handle.adapters[name]
    adapters = {t: handle.model.get_submodule(t).named[name] for t in info.targets}
    if get_method(info.method).placement != "layer" or not all(hasattr(a, "factors") for a in adapters.values()):
        raise PeftError(f"format='peft': HF peft has no {info.method!r} adapter (it takes LoRA-shaped layer "
                        f"methods and {sorted(peft_prompt_format.METHODS)}): save with format='llmkit'")
    if info.method == "lora":
        return record
    targets = {t: dict(zip(("lora_B", "lora_A"), (f.detach().cpu() for f in a.factors()))) for t, a in adapters.items()}
    return dataclasses.replace(record, method="lora", targets=targets,
                               config={**record.config, "scale": 1.0, "rslora": False})


def read(model: nn.Module, directory, adapter_name: Optional[str] = None) -> list[AdapterRecord]:
    """The records in `directory` for `model`: a peft directory's one adapter named `adapter_name`
    (default "default"), an llmkit one's adapters (only `adapter_name` if given)."""
    config = serialization.read_config(directory)
    if "peft_type" in config:
        peft_type = config["peft_type"]
        if peft_type == "LORA":
            records = peft_format.read(directory, hf_rules(model))
        elif peft_type in peft_prompt_format.PEFT_TYPES:
            records = peft_prompt_format.read(directory, peft_layout(model), hf_rules(model))
        else:
            raise CheckpointError(f"{Path(directory) / serialization.CONFIG_FILE}: key 'peft_type': expected one "
                                  f"of {sorted(PEFT_TYPES)} (the HF peft types llmkit reads), found {peft_type!r}")
        records[0].name = adapter_name or "default"
        return records
    records = serialization.read(directory)
    chosen = [r for r in records if adapter_name in (None, r.name)]
    if not chosen:
        raise CheckpointError(f"{Path(directory)}: no adapter {adapter_name!r} (found {sorted(r.name for r in records)})")
    return chosen


def copy_checked(module: nn.Module, tensors: dict[str, torch.Tensor], where: str, optional=()) -> None:
    """Copy saved tensors into `module`'s state (in its dtype) once names match exactly (the
    `optional` ones may be absent) and every shape does."""
    state = module.state_dict(keep_vars=True)
    missing, unknown = sorted(set(state) - set(tensors) - set(optional)), sorted(set(tensors) - set(state))
    if missing or unknown:
        raise CheckpointError(f"{where}: expected tensors {sorted(state)}; missing {missing}, unknown {unknown}")
    for key, tensor in tensors.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}.{key}: expected shape {list(state[key].shape)} (from this model's "
                                  f"layer), found {list(tensor.shape)}: the adapter was made for a model with "
                                  "different layer sizes")
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor.to(state[key].dtype))


def hf_rules(model: nn.Module) -> Optional[dict]:
    """llmkit tensor key -> its io `Rule` (HF name, fused part) for an llmkit model save_hf can
    export; None for any other torch module (names are then used as they are)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "family"):
        return None
    from ..io.families import FAMILIES
    from ..io.hf import task_of
    if config.family not in FAMILIES:
        raise PeftError(f"format='peft': ModelConfig.family={config.family!r} has no Hugging Face layout "
                        f"(expected one of {sorted(FAMILIES)}); save with format='llmkit'")
    family, head = FAMILIES[config.family], ()
    try:
        if isinstance(model, SequenceClassifier):    # transformers' *ForSequenceClassification: the LM's body
            task, head = next(iter(family.TASKS)), CLASSIFIER_HEADS.get(config.family, ())
        else:
            task = task_of(model)
        rules = [*family.rules(config, task), *(Rule(ours, theirs) for ours, theirs in head)]
    except CheckpointError as exc:
        raise PeftError(f"format='peft' needs a model llmkit.save_hf can export ({exc}); "
                        "save with format='llmkit'") from exc
    return {rule.ours: rule for rule in rules}


def peft_layout(model: nn.Module) -> peft_prompt_format.Layout:
    """What the prompt / prefix / IA3 codec needs of `model`: its PEFT task type, the prompt slot,
    every attention layer's prefix slot and key/value shape."""
    task = next((t for cls, t in TASK_TYPES if isinstance(model, cls)), None)
    named = visible_modules(model)
    prompt, prefix = get_method("prompt_tuning"), get_method("prefix_tuning")
    prompt_hosts = prompt.narrow([n for n, m in named.items() if prompt.accepts(m)])
    hosts = [n for n, m in named.items() if prefix.accepts(m)]
    kv = {kv_shape(named[h]) for h in hosts}
    config = getattr(model, "config", None)
    first_token = isinstance(model, SequenceClassifier) and (model.pooler is not None or model.pooling == "cls")
    return peft_prompt_format.Layout(
        task, getattr(config, "d_model", None), getattr(config, "n_heads", None),
        f"{prompt_hosts[0]}.{prompt.slot}" if prompt_hosts else None, tuple(f"{h}.{prefix.slot}" for h in hosts),
        next(iter(kv)) if len(kv) == 1 else None, first_token)
