"""HF PEFT's LoRA files as a codec below the handle: `read(directory, names) -> [record]` and
`write(directory, records, names, embeddings)`, records as in serialization.py.

Keys are `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r),
`.lora_embedding_A` (r, V) / `.lora_embedding_B` (d, r) for embeddings, and
`base_model.model.<HF tensor>` for modules_to_save. `names` maps llmkit tensor keys to the family
rules `llmkit.save_hf` uses (io/rules.py `Rule`s; None: names stay as they are), so an adapter
written here loads with `peft.PeftModel.from_pretrained` onto the transformers model `save_hf`
wrote, and one peft made loads back. GPT-2 fuses q, k, v into one `c_attn`: the llmkit adapters of
q/k/v become one LoRA of rank Σ r_i with A = [A_q; A_k; A_v] and block-diagonal B (exact), and a
peft `c_attn` adapter splits back into q/k/v adapters sharing its A.

Records are LoRA-shaped: lora_A and lora_B per module (the handle turns any other method into its
ΔW = B' A'). A record whose config has a `scale` gets it folded into B (alpha = r, so PEFT's scale
is 1); a plain LoRA keeps its own A, B, r and alpha. Records read back carry scale 1.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch

from ..io.errors import CheckpointError
from .errors import PeftError
from .serialization import CONFIG_FILE, WEIGHTS_FILE, AdapterRecord, read_files, write_files

PREFIX = "base_model.model."
_LORA_KEYS = ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
              (".lora_embedding_A", "lora_A"), (".lora_embedding_B", "lora_B"))


def hf_modules(names: Optional[dict]) -> Optional[dict[str, tuple[str, Optional[int], int]]]:
    """llmkit module -> (HF module, part, parts), from the tensor rules of the modules' weights."""
    if names is None:
        return None
    return {k[:-len(".weight")]: (r.theirs[:-len(".weight")], r.part, r.parts)
            for k, r in names.items() if k.endswith(".weight") and r.theirs.endswith(".weight")}


def _rank_div(r: int, rslora: bool) -> float:
    return math.sqrt(r) if rslora else float(r)


def write(directory: Union[str, Path], records: list[AdapterRecord], names: Optional[dict],
          embeddings: set[str]) -> Path:
    """Write one LoRA-shaped record; `embeddings` names its nn.Embedding targets."""
    if len(records) != 1:
        raise PeftError(f"format='peft' writes one adapter per directory, got {[r.name for r in records]}")
    record, modules = records[0], hf_modules(names)
    config, scale = record.config, record.config.get("scale")
    rslora = bool(config.get("rslora"))
    groups: dict[str, list] = {}                       # HF module -> [(part, parts, A, B, alpha, emb)]
    for module, own in record.targets.items():
        if modules is not None and module not in modules:
            raise PeftError(f"format='peft': module {module!r} has no Hugging Face name in this family's rules")
        hf, part, parts = modules[module] if modules is not None else (module, None, 1)
        A, B = own["lora_A"].float(), own["lora_B"].float()                       # (r, in), (out, r)
        alpha = float(config["alpha"]) if scale is None else None                 # None: scale in B
        groups.setdefault(hf, []).append((part, parts, A, B if scale is None else B * scale, alpha,
                                          module in embeddings))

    tensors, ranks, alphas = {}, {}, {}
    for hf, items in groups.items():
        if len(items) == 1 and items[0][0] is None:
            _, _, A, B, alpha, emb = items[0]
        else:                                           # fused: rank-Σr adapter, block-diagonal B
            items = sorted(items, key=lambda t: t[0])
            parts, out_part = items[0][1], items[0][3].shape[0]
            A = torch.cat([t[2] for t in items], dim=0)                            # (Σr, in)
            B = torch.zeros(parts * out_part, A.shape[0])                          # (parts out, Σr)
            col = 0
            for part, _, a, b, alpha, _ in items:
                s = 1.0 if alpha is None else alpha / _rank_div(a.shape[0], rslora)
                B[part * out_part:(part + 1) * out_part, col:col + a.shape[0]] = b * s
                col += a.shape[0]
            alpha, emb = None, False
        r = ranks[hf] = A.shape[0]
        alphas[hf] = alpha if alpha is not None else _rank_div(r, rslora)
        keys = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        tensors.update({f"{PREFIX}{hf}.{keys[0]}": A.contiguous(), f"{PREFIX}{hf}.{keys[1]}": B.contiguous()})

    saved_names = []
    for module, own in record.saved.items():
        for key, tensor in own.items():
            ours = f"{module}.{key}"
            if names is not None and ours not in names:
                raise PeftError(f"format='peft': {ours!r} has no Hugging Face name; save with format='llmkit'")
            tensors[PREFIX + (names[ours].theirs if names is not None else ours)] = tensor.float().contiguous()
        weight = (names or {}).get(f"{module}.weight")
        saved_names.append(weight.theirs[:-len(".weight")] if weight is not None else module)

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    meta = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": float(config.get("dropout", 0.0)), "bias": "none",
        "use_rslora": rslora, "use_dora": False, "init_lora_weights": True,
        "fan_in_fan_out": any(rule.transpose for rule in (names or {}).values()),     # GPT-2's Conv1D
        "target_modules": sorted(groups), "modules_to_save": saved_names or None,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
    }
    return write_files(directory, meta, tensors)


def read(directory: Union[str, Path], names: Optional[dict]) -> list[AdapterRecord]:
    """One LoRA record (named "default") from a peft LoRA directory, in llmkit module names."""
    config, tensors = read_files(directory)
    source, weights = Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{source}: key 'peft_type': expected 'LORA' (the PEFT type llmkit reads), "
                              f"found {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise CheckpointError(f"{source}: key 'use_dora': expected false (not supported), found {config['use_dora']!r}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{source}: key 'bias': expected 'none', found {config['bias']!r}")
    reverse: dict[str, list[tuple[str, Optional[int], int]]] = {}
    for ours, (theirs, part, parts) in (hf_modules(names) or {}).items():
        reverse.setdefault(theirs, []).append((ours, part, parts))

    def ours_of(hf: str) -> list[tuple[str, Optional[int], int]]:
        if names is not None and hf not in reverse:
            raise CheckpointError(f"{weights}: module {hf!r} has no llmkit counterpart in this model's "
                                  "family rules")
        return reverse.get(hf, [(hf, None, 1)])

    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, dict[str, torch.Tensor]] = {}
    tensor_reverse = {r.theirs: ours for ours, r in (names or {}).items()}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights}: tensor {key!r}: expected names starting with {PREFIX!r}")
        body = key[len(PREFIX):]
        suffix = next(((s, kind) for s, kind in _LORA_KEYS if body.endswith(s)), None)
        if suffix is not None:
            module = body[:-len(suffix[0])]
            lora.setdefault(module[:-len(".default")] if module.endswith(".default") else module, {})[suffix[1]] = tensor
        elif ".base_layer." in body:      # save_embedding_layers: the full (maybe resized) base table
            module, _, param = body.replace(".base_layer.", ".").rpartition(".")
            base.setdefault(ours_of(module)[0][0], {})[param] = tensor
        else:
            module, _, param = tensor_reverse.get(body, body).rpartition(".")
            saved.setdefault(module, {})[param] = tensor

    targets = {}
    for hf, pair in lora.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights}: module {hf!r} has {sorted(pair)} only; expected both lora_A and lora_B")
        A, B = pair["lora_A"], pair["lora_B"]
        alpha = _pattern(config.get("alpha_pattern") or {}, hf, config.get("lora_alpha", 8))
        scale = alpha / _rank_div(A.shape[0], bool(config.get("use_rslora", False)))
        for ours, part, parts in ours_of(hf):
            b = B if part is None else B.chunk(parts, dim=0)[part]
            targets[ours] = {"lora_A": A, "lora_B": b * scale}      # the scale folds into B
    ranks = {m: t["lora_A"].shape[0] for m, t in targets.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    options = {"r": r0, "scale": 1.0, "dropout": float(config.get("lora_dropout", 0.0) or 0.0),
               "targets": list(targets)}
    return [AdapterRecord("default", "lora", options, targets, saved, {m: r for m, r in ranks.items() if r != r0},
                          True, base)]


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
