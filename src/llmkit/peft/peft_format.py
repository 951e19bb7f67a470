"""HF PEFT's LoRA file format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r),
`.lora_embedding_A` (r, V) / `.lora_embedding_B` (d, r) for embeddings, and
`base_model.model.<HF module>.<param>` for modules_to_save. The HF module names of an llmkit
model come from the same family rules `llmkit.save_hf` uses (io/families/), so an adapter saved
here loads with `peft.PeftModel.from_pretrained` onto the transformers model `save_hf` wrote, and
an adapter peft made loads back. GPT-2 fuses q, k, v into one `c_attn`: the llmkit adapters of
q/k/v become one LoRA of rank Σ r_i with A = [A_q; A_k; A_v] and block-diagonal B (exact), and a
peft `c_attn` adapter splits back into q/k/v adapters sharing its A.

Every method exports as a plain LoRA: ΔW = B' A' with its scale folded into B' (alpha = r, so
PEFT's scale is 1), except a plain LoRA adapter, which keeps its own A, B, r and alpha.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..io.errors import CheckpointError
from ..io.safetensors_files import atomic_save_tensors, atomic_write_text, read_json
from .errors import PeftError

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


# ---- module-name mapping -----------------------------------------------------------------------

def module_map(model: nn.Module) -> Optional[dict[str, tuple[str, Optional[int], int]]]:
    """llmkit module name -> (HF module name, part, parts) for an llmkit model save_hf can export;
    None for any other torch module (names are then used as they are)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "family"):
        return None
    from ..io.families import FAMILIES
    from ..io.hf import task_of
    if config.family not in FAMILIES:
        raise PeftError(f"format='peft': ModelConfig.family={config.family!r} has no Hugging Face layout "
                        f"(expected one of {sorted(FAMILIES)}); save with format='llmkit'")
    try:
        task = task_of(model)
    except CheckpointError as exc:
        raise PeftError(f"format='peft' needs a model llmkit.save_hf can export ({exc}); "
                        "save with format='llmkit'") from exc
    out = {}
    for rule in FAMILIES[config.family].rules(config, task):
        if rule.ours.endswith(".weight"):
            out[rule.ours[:-len(".weight")]] = (rule.theirs[:-len(".weight")], rule.part, rule.parts)
    return out


def _hf_name(mapping, name: str) -> tuple[str, Optional[int], int]:
    if mapping is None:
        return name, None, 1
    if name not in mapping:
        raise PeftError(f"format='peft': module {name!r} has no Hugging Face name in this family's rules")
    return mapping[name]


def _param_rules(model: nn.Module, module_name: str) -> dict[str, str]:
    """Tensor names of a saved module (a head): llmkit key -> HF key."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "family"):
        return {}
    from ..io.families import FAMILIES
    from ..io.hf import task_of
    return {r.ours: r.theirs for r in FAMILIES[config.family].rules(config, task_of(model))
            if r.ours.startswith(module_name + ".")}


# ---- export ------------------------------------------------------------------------------------

def export(handle, name: str, directory: Path) -> None:
    from .lora import LoraAdapter, LoraEmbeddingAdapter
    model = handle.model
    info = handle.adapters[name]
    mapping = module_map(model)
    rslora = bool(getattr(info.config, "rslora", False)) and info.method == "lora"
    plain = info.method == "lora" and getattr(info.config, "scale", None) is None

    groups: dict[str, list] = {}                       # HF module -> [(part, parts, A, B, alpha, emb)]
    for module_name, layer, adapter in handle.adapter_modules(name):
        hf, part, parts = _hf_name(mapping, module_name)
        emb = layer.is_embedding
        with torch.no_grad():
            if plain and isinstance(adapter, (LoraAdapter, LoraEmbeddingAdapter)):
                A, B, alpha = adapter.lora_A, adapter.lora_B, float(info.config.alpha)
            else:
                B, A = adapter.factors()
                alpha = None                            # scale 1: alpha = r (or sqrt(r) under rslora)
        groups.setdefault(hf, []).append((part, parts, A.detach().float(), B.detach().float(), alpha, emb))

    tensors, ranks, alphas = {}, {}, {}
    for hf, items in groups.items():
        if len(items) == 1 and items[0][0] is None:
            _, _, A, B, alpha, emb = items[0]
        else:                                           # fused: rank-Σr adapter, block-diagonal B
            items = sorted(items, key=lambda t: t[0])
            parts, out_part = items[0][1], items[0][3].shape[0]
            scales = [1.0 if a is None else a / _rank_div(A.shape[0], rslora) for _, _, A, _, a, _ in items]
            A = torch.cat([t[2] for t in items], dim=0)                            # (Σr, in)
            B = torch.zeros(parts * out_part, A.shape[0])                          # (3 out, Σr)
            col = 0
            for (part, _, a, b, _, _), s in zip(items, scales):
                B[part * out_part:(part + 1) * out_part, col:col + a.shape[0]] = b * s
                col += a.shape[0]
            alpha, emb = None, False
        r = A.shape[0]
        ranks[hf] = r
        alphas[hf] = alpha if alpha is not None else (math.sqrt(r) if rslora else float(r))
        if emb:
            tensors[f"{PREFIX}{hf}.lora_embedding_A"] = A.contiguous()
            tensors[f"{PREFIX}{hf}.lora_embedding_B"] = B.contiguous()
        else:
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = A.contiguous()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = B.contiguous()

    saved_names = []
    for module_name in info.saved:
        module = model.get_submodule(module_name)
        copy = module.copies[name]
        rename = _param_rules(model, module_name)
        for key, tensor in copy.state_dict().items():
            ours = f"{module_name}.{key}"
            theirs = rename.get(ours, ours) if mapping is not None else ours
            if mapping is not None and ours not in rename:
                raise PeftError(f"format='peft': {ours!r} has no Hugging Face name; save with format='llmkit'")
            tensors[PREFIX + theirs] = tensor.detach().float().contiguous()
        hf_mod = rename.get(f"{module_name}.weight", f"{module_name}.weight")[:-len(".weight")]
        saved_names.append(hf_mod)

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    family = getattr(getattr(model, "config", None), "family", None)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": float(info.config.dropout), "bias": "none",
        "use_rslora": rslora, "use_dora": False, "init_lora_weights": True,
        "fan_in_fan_out": family == "gpt2",
        "target_modules": sorted(groups), "modules_to_save": saved_names or None,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
    }
    atomic_save_tensors(tensors, directory / WEIGHTS_FILE)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))


def _rank_div(r: int, rslora: bool) -> float:
    return math.sqrt(r) if rslora else float(r)


# ---- import ------------------------------------------------------------------------------------

def import_adapter(model: nn.Module, directory: Path, config: dict, tensors: dict[str, torch.Tensor],
                   adapter_name: str):
    """Build a llmkit LoRA adapter from a peft LoRA directory (config + tensors already read)."""
    from .handle import PeftHandle, handle_of
    source = directory / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{source}: key 'peft_type': expected 'LORA' (the PEFT type llmkit reads), "
                              f"found {config.get('peft_type')!r}")
    for flag in ("use_dora",):
        if config.get(flag):
            raise CheckpointError(f"{source}: key {flag!r}: expected false (not supported), found {config[flag]!r}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{source}: key 'bias': expected 'none', found {config['bias']!r}")
    mapping = module_map(model)
    reverse: dict[str, list[tuple[str, Optional[int], int]]] = {}
    if mapping is not None:
        for ours, (theirs, part, parts) in mapping.items():
            reverse.setdefault(theirs, []).append((ours, part, parts))

    rslora = bool(config.get("use_rslora", False))
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    saved_tensors: dict[str, torch.Tensor] = {}
    base_tensors: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensor {key!r}: expected names starting "
                                  f"with {PREFIX!r}")
        body = key[len(PREFIX):]
        for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_embedding_A", "A"), (".lora_embedding_B", "B")):
            if body.endswith(suffix):
                module = body[:-len(suffix)]
                module = module[:-len(".default")] if module.endswith(".default") else module
                by_module.setdefault(module, {})[kind] = tensor
                break
        else:
            if ".base_layer." in body:        # save_embedding_layers: the full (maybe resized) base table
                base_tensors[body.replace(".base_layer.", ".")] = tensor
            else:
                saved_tensors[body] = tensor

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}   # llmkit module -> (A, B, scale)
    for hf, pair in by_module.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: module {hf!r} has lora {sorted(pair)} only; "
                                  "expected both A and B")
        A, B = pair["A"], pair["B"]
        r = A.shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, hf, config.get("lora_alpha", 8))
        scale = alpha / _rank_div(r, rslora)
        targets = reverse.get(hf, [(hf, None, 1)]) if mapping is not None else [(hf, None, 1)]
        if mapping is not None and hf not in reverse:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: module {hf!r} is not a module of this "
                                  f"{type(model).__name__} (family {model.config.family!r})")
        for ours, part, parts in targets:
            b = B if part is None else B.chunk(parts, dim=0)[part]
            factors[ours] = (A, b, scale)

    ranks = {m: f[0].shape[0] for m, f in factors.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    handle = handle_of(model) or PeftHandle(model)
    handle.add_adapter(adapter_name, "lora", r=r0, targets=list(factors), scale=1.0,
                       dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                       rank_pattern={m: r for m, r in ranks.items() if r != r0})
    try:
        with torch.no_grad():
            for module_name, layer, adapter in handle.adapter_modules(adapter_name):
                A, B, scale = factors[module_name]
                _check_shape(directory, module_name, "lora_A", adapter.lora_A, A)
                _check_shape(directory, module_name, "lora_B", adapter.lora_B, B)
                adapter.lora_A.copy_(A)
                adapter.lora_B.copy_(B * scale)          # the scale folds into B (config scale 1)
            _load_saved(handle, adapter_name, model, directory, config, saved_tensors, mapping)
            _load_base(model, directory, base_tensors, reverse)
    except Exception:
        handle.delete_adapter(adapter_name)
        raise
    return handle


def _load_base(model, directory, base_tensors, reverse) -> None:
    """Base weights peft stores beside an embedding adapter (save_embedding_layers): copied in
    after a shape check, as peft itself does on load."""
    for key, tensor in base_tensors.items():
        hf_module = key[:-len(".weight")] if key.endswith(".weight") else key
        ours = reverse[hf_module][0][0] if hf_module in reverse else hf_module
        layer = model.get_submodule(ours)
        weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
        _check_shape(directory, ours, "weight", weight, tensor)
        weight.copy_(tensor.to(weight.dtype))


def _load_saved(handle, name, model, directory, config, saved_tensors, mapping) -> None:
    if not saved_tensors:
        return
    from .layers import SavedModule, set_submodule
    reverse = {}
    config_obj = getattr(model, "config", None)
    if mapping is not None:
        from ..io.families import FAMILIES
        from ..io.hf import task_of
        reverse = {r.theirs: r.ours for r in FAMILIES[config_obj.family].rules(config_obj, task_of(model))}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in saved_tensors.items():
        ours = reverse.get(key, key)
        module_name, _, param = ours.rpartition(".")
        by_module.setdefault(module_name, {})[param] = tensor
    for module_name, params in by_module.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: saved module {module_name!r} is not in "
                                  f"{type(model).__name__}") from None
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            set_submodule(model, module_name, module)
        module.add(name)
        state = module.copies[name].state_dict()
        for param, tensor in params.items():
            if param not in state:
                raise CheckpointError(f"{directory / WEIGHTS_FILE}: {module_name}.{param} is not a tensor of "
                                      f"that module (it has {sorted(state)})")
            _check_shape(directory, module_name, param, state[param], tensor)
            state[param].copy_(tensor)
        handle.adapters[name].saved.append(module_name)
    handle.set_active(name)


def _check_shape(directory: Path, module: str, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    if tuple(ours.shape) != tuple(theirs.shape):
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: {module}.{what}: expected shape {list(ours.shape)} "
                              f"(from this model's layer), found {list(theirs.shape)}: the adapter was made "
                              "for a model with different layer sizes")


def _pattern(patterns: dict, module: str, default):
    import re
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_config(directory: Path) -> dict:
    return read_json(directory / CONFIG_FILE)
