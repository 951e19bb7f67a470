"""HF PEFT's PROMPT_TUNING, PREFIX_TUNING and IA3 files as a codec below the handle:
`read(directory, layout, names) -> [record]` and `write(directory, record, layout, names)`, records
as in serialization.py (peft_format.py is the LoRA codec).

- PROMPT_TUNING: one tensor `prompt_embeddings` (p, d), the virtual token embeddings; llmkit's
  `prompt_tuning` record holds the same rows as `prompt` at the stack's `input_prompt` slot.
- PREFIX_TUNING: `prompt_embeddings` (p, L·2·token_dim), token_dim = n_kv·d_h. PEFT views it as
  (p, L·2, n_kv, d_h), permutes to (L·2, n_kv, p, d_h) and takes rows 2i, 2i+1 as layer i's key and
  value, so layer i's block is columns [2i·token_dim, 2(i+1)·token_dim) seen as (p, 2, n_kv, d_h):
  exactly llmkit's `prefix` of the layer's `kv_prefix` slot. PEFT saves this folded table whether
  or not it trained through its MLP (`prefix_projection` only records the training form), so a
  prefix written here is the folded one and a prefix read back is plain (projection=False).
  p_tuning_v2 writes as PREFIX_TUNING without projection.
- IA3: `base_model.model.<HF module>.ia3_l`, (out, 1) for a layer that scales its output, (1, in)
  for a `feedforward_modules` one that scales its input; llmkit's vector is the flat (n,). GPT-2
  fuses q, k, v into `c_attn`: their output vectors concatenate (ones for a part the record leaves
  out) and a `c_attn` vector splits back into q/k/v vectors.

Trained copies of heads (modules_to_save) are `base_model.<HF tensor>` for the prompt methods (PEFT
wraps the transformers model directly) and `base_model.model.<HF tensor>` for IA3. `names` maps
llmkit tensor keys to the io family `Rule`s (None: names stay as they are); `Layout` is what the
codec must know of the llmkit model, as data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..io.errors import CheckpointError
from .errors import PeftError
from .ia3 import IA3Config, is_feedforward
from .peft_format import hf_modules
from .serialization import CONFIG_FILE, WEIGHTS_FILE, AdapterRecord, read_files, write_files

PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "IA3": "ia3"}
METHODS = {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning_v2": "PREFIX_TUNING",
           "ia3": "IA3"}
PROMPT_TASKS = ("CAUSAL_LM", "SEQ_CLS")     # PEFT's task models whose forward feeds the one stack
LAYER_PREFIX, PROMPT_PREFIX, EMBEDDINGS = "base_model.model.", "base_model.", "prompt_embeddings"


@dataclass(frozen=True)
class Layout:
    """The llmkit model as the codec sees it."""
    task_type: Optional[str]                  # PEFT's task type for the model class (None: none fits)
    d_model: Optional[int]
    n_heads: Optional[int]
    prompt_site: Optional[str]                # the stack's input_prompt slot path
    prefix_sites: tuple[str, ...] = ()        # every attention layer's kv_prefix slot path, in order
    kv: Optional[tuple[int, int]] = None      # (n_kv, head_dim), None where the layers differ
    pools_first_token: bool = False           # a classifier reading position 0 ([CLS])


def _check_prompt_task(layout: Layout, what: str) -> None:
    if layout.task_type not in PROMPT_TASKS:
        raise PeftError(f"format='peft': HF peft runs {what} only in its task models {list(PROMPT_TASKS)} "
                        f"(an llmkit CausalLM or SequenceClassifier); this model maps to task_type "
                        f"{layout.task_type!r}: save with format='llmkit'")
    if layout.task_type == "SEQ_CLS" and layout.pools_first_token and what == "PROMPT_TUNING":
        raise PeftError("format='peft': HF peft puts the prompt before [CLS], so a transformers classifier "
                        "pools a virtual token where this llmkit classifier pools the real first token; "
                        "save with format='llmkit'")


def write(directory: Union[str, Path], record: AdapterRecord, layout: Layout, names: Optional[dict]) -> Path:
    """Write one prompt_tuning / prefix_tuning / p_tuning_v2 / ia3 record (a prefix already folded)."""
    peft_type = METHODS.get(record.method)
    if peft_type is None:
        raise PeftError(f"format='peft': no PEFT type for method {record.method!r} here (expected one of "
                        f"{sorted(METHODS)})")
    meta = {"peft_type": peft_type, "task_type": layout.task_type, "base_model_name_or_path": None,
            "revision": None, "inference_mode": True}
    if peft_type == "IA3":
        tensors = _write_ia3(record, names, meta)
        prefix = LAYER_PREFIX
    else:
        _check_prompt_task(layout, peft_type)
        table = (_write_prompt if peft_type == "PROMPT_TUNING" else _write_prefix)(record, layout, meta)
        tensors = {EMBEDDINGS: table}
        prefix = PROMPT_PREFIX
    saved_modules = []
    for module, own in record.saved.items():
        hf_module = module
        for key, tensor in own.items():
            ours = f"{module}.{key}"
            if names is not None and ours not in names:
                raise PeftError(f"format='peft': {ours!r} has no Hugging Face name; save with format='llmkit'")
            theirs = names[ours].theirs if names is not None else ours
            tensors[prefix + theirs] = tensor.float().contiguous()
            hf_module = theirs.rpartition(".")[0] or theirs        # the HF module holding the tensor
        saved_modules.append(hf_module)
    meta["modules_to_save"] = saved_modules or None
    return write_files(directory, meta, tensors)


def _write_prompt(record: AdapterRecord, layout: Layout, meta: dict) -> torch.Tensor:
    (site, own), = record.targets.items()
    if site != layout.prompt_site:
        raise PeftError(f"format='peft': the prompt sits at {site!r}; HF peft prompts the model's input "
                        f"({layout.prompt_site!r}): save with format='llmkit'")
    prompt = own["prompt"].float().contiguous()                                    # (p, d)
    meta.update({"num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1],
                 "num_transformer_submodules": 1, "num_attention_heads": layout.n_heads,
                 "num_layers": len(layout.prefix_sites), "prompt_tuning_init": "RANDOM",
                 "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None})
    return prompt


def _write_prefix(record: AdapterRecord, layout: Layout, meta: dict) -> torch.Tensor:
    sites = list(layout.prefix_sites)
    if sorted(record.targets) != sorted(sites):
        raise PeftError(f"format='peft': HF peft's PREFIX_TUNING puts a prefix in every attention layer "
                        f"({len(sites)} here); this {record.method} adapter fills {len(record.targets)} of them "
                        "(or other slots): save with format='llmkit'")
    if layout.kv is None:
        raise PeftError("format='peft': HF peft's PREFIX_TUNING needs one key/value width in every layer; "
                        "save with format='llmkit'")
    n_kv, head_dim = layout.kv
    blocks = [record.targets[s]["prefix"].float() for s in sites]                 # each (p, 2, n_kv, hd)
    p = blocks[0].shape[0]
    for site, block in zip(sites, blocks):
        if tuple(block.shape) != (p, 2, n_kv, head_dim):
            raise PeftError(f"format='peft': {site}: prefix of shape {list(block.shape)}, expected "
                            f"{[p, 2, n_kv, head_dim]}")
    token_dim, config = n_kv * head_dim, record.config
    projection = bool(config.get("projection", False))
    meta.update({"num_virtual_tokens": p, "token_dim": token_dim, "num_transformer_submodules": 1,
                 "num_attention_heads": n_kv, "num_layers": len(sites), "prefix_projection": projection,
                 "encoder_hidden_size": int(config["encoder_hidden_size"]) if projection else token_dim,
                 "init_weights": None})
    return torch.cat([b.reshape(p, 2 * token_dim) for b in blocks], dim=1).contiguous()   # (p, L·2·token_dim)


def _write_ia3(record: AdapterRecord, names: Optional[dict], meta: dict) -> dict[str, torch.Tensor]:
    modules = hf_modules(names)
    ff_config = IA3Config(feedforward_modules=list(record.config.get("feedforward_modules") or []))
    groups: dict[str, list] = {}                        # HF module -> [(part, parts, vector, feedforward)]
    for module, own in record.targets.items():
        if modules is not None and module not in modules:
            raise PeftError(f"format='peft': module {module!r} has no Hugging Face name in this family's rules")
        hf, part, parts = modules[module] if modules is not None else (module, None, 1)
        groups.setdefault(hf, []).append((part, parts, own["ia3_l"].float().reshape(-1),
                                          is_feedforward(module, ff_config)))
    tensors, feedforward = {}, []
    for hf, items in groups.items():
        ff = {item[3] for item in items}
        if len(ff) > 1:
            raise PeftError(f"format='peft': {hf!r} fuses layers that scale their input and their output; "
                            "save with format='llmkit'")
        ff = ff.pop()
        if items[0][0] is None:
            vector = items[0][2]
        elif ff:                                        # a fused layer has one input: one vector for all
            if len(items) != items[0][1] or any(not torch.equal(items[0][2], t[2]) for t in items):
                raise PeftError(f"format='peft': {hf!r} fuses {items[0][1]} layers sharing one input; their "
                                "input vectors must be present and equal: save with format='llmkit'")
            vector = items[0][2]
        else:                                           # output parts side by side, ones where not adapted
            n = items[0][2].numel()
            vector = torch.ones(items[0][1] * n)
            for part, _, v, _ in items:
                vector[part * n:(part + 1) * n] = v
        tensors[f"{LAYER_PREFIX}{hf}.ia3_l"] = (vector[None, :] if ff else vector[:, None]).contiguous()
        if ff:
            feedforward.append(hf)
    meta.update({"target_modules": sorted(groups), "feedforward_modules": sorted(feedforward),
                 "fan_in_fan_out": any(rule.transpose for rule in (names or {}).values()),     # GPT-2's Conv1D
                 "init_ia3_weights": True, "exclude_modules": None})
    return tensors


def read(directory: Union[str, Path], layout: Layout, names: Optional[dict]) -> list[AdapterRecord]:
    """One record (named "default") from a PEFT PROMPT_TUNING / PREFIX_TUNING / IA3 directory."""
    config, tensors = read_files(directory)
    source, weights = Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise CheckpointError(f"{source}: key 'peft_type': expected one of {sorted(PEFT_TYPES)}, found {peft_type!r}")
    tensor_reverse = {r.theirs: ours for ours, r in (names or {}).items()}
    if peft_type == "IA3":
        targets, options, rest = _read_ia3(config, tensors, names, weights)
        prefix = LAYER_PREFIX
    else:
        subs = config.get("num_transformer_submodules") or 1
        if subs != 1:
            raise CheckpointError(f"{source}: key 'num_transformer_submodules' (peft_type {peft_type!r}): "
                                  f"expected 1 (llmkit reads prompts and prefixes of one stack, a decoder or an "
                                  f"encoder; supported peft types {sorted(PEFT_TYPES) + ['LORA']}), found {subs!r}")
        if peft_type == "PROMPT_TUNING" and config.get("task_type") == "SEQ_CLS" and layout.pools_first_token:
            raise CheckpointError(f"{source}: key 'task_type': 'SEQ_CLS' with a prompt before [CLS] (the "
                                  "position transformers' classifier pools), but this llmkit classifier pools "
                                  "the real first token past the prompt; expected a model that does not pool "
                                  "position 0 (a decoder's last token)")
        rest = dict(tensors)
        table = rest.pop(EMBEDDINGS, None)
        if table is None:
            raise CheckpointError(f"{weights}: tensor {EMBEDDINGS!r} is missing (found {sorted(tensors)[:4]})")
        p = config.get("num_virtual_tokens")
        if not isinstance(p, int) or p <= 0 or table.dim() != 2 or table.shape[0] != p:
            raise CheckpointError(f"{weights}: {EMBEDDINGS}: expected {p!r} rows (key 'num_virtual_tokens' of "
                                  f"{CONFIG_FILE}), found shape {list(table.shape)}")
        read_one = _read_prompt if peft_type == "PROMPT_TUNING" else _read_prefix
        targets, options = read_one(config, table, layout, source)
        prefix = PROMPT_PREFIX
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in rest.items():
        if not key.startswith(prefix):
            raise CheckpointError(f"{weights}: tensor {key!r}: expected names starting with {prefix!r} "
                                  f"for peft_type {peft_type!r}")
        body = key[len(prefix):]
        if names is not None and body not in tensor_reverse:
            raise CheckpointError(f"{weights}: tensor {key!r} has no llmkit counterpart in this model's family rules")
        module, _, param = tensor_reverse.get(body, body).rpartition(".")
        saved.setdefault(module, {})[param] = tensor
    return [AdapterRecord("default", PEFT_TYPES[peft_type], options, targets, saved)]


def _read_prompt(config: dict, table: torch.Tensor, layout: Layout, source: Path):
    if layout.prompt_site is None:
        raise CheckpointError(f"{source}: a PROMPT_TUNING adapter, but the model has no input_prompt slot")
    host = layout.prompt_site.rpartition(".")[0]
    return ({layout.prompt_site: {"prompt": table}},
            {"num_virtual_tokens": table.shape[0], "init": "random", "targets": [host]})


def _read_prefix(config: dict, table: torch.Tensor, layout: Layout, source: Path):
    sites, (p, width) = list(layout.prefix_sites), table.shape
    heads, token_dim = config.get("num_attention_heads"), config.get("token_dim")
    if config.get("num_layers") != len(sites):
        raise CheckpointError(f"{source}: key 'num_layers': expected {len(sites)} (this model's attention "
                              f"layers), found {config.get('num_layers')!r}")
    expected = None if layout.kv is None else [layout.kv[0], layout.kv[0] * layout.kv[1]]
    if expected is None or [heads, token_dim] != expected:
        raise CheckpointError(f"{source}: keys 'num_attention_heads', 'token_dim': expected {expected} (this "
                              f"model's key/value heads and their width), found {[heads, token_dim]}")
    if width != len(sites) * 2 * token_dim:
        raise CheckpointError(f"{source}: {EMBEDDINGS}: expected {len(sites) * 2 * token_dim} columns "
                              f"(num_layers · 2 · token_dim), found {width}")
    n_kv, head_dim = layout.kv
    targets = {site: {"prefix": table[:, i * 2 * token_dim:(i + 1) * 2 * token_dim].reshape(p, 2, n_kv, head_dim)
                      .contiguous()} for i, site in enumerate(sites)}
    return targets, {"num_virtual_tokens": p, "projection": False,
                     "targets": [s.rpartition(".")[0] for s in sites]}


def _read_ia3(config: dict, tensors: dict, names: Optional[dict], weights: Path):
    reverse: dict[str, list[tuple[str, Optional[int], int]]] = {}
    for ours, (theirs, part, parts) in (hf_modules(names) or {}).items():
        reverse.setdefault(theirs, []).append((ours, part, parts))
    targets, feedforward, rest = {}, [], {}
    for key, tensor in tensors.items():
        body = key[len(LAYER_PREFIX):] if key.startswith(LAYER_PREFIX) else None
        if body is None or not body.endswith(".ia3_l"):
            rest[key] = tensor
            continue
        hf = body[:-len(".ia3_l")]
        if names is not None and hf not in reverse:
            raise CheckpointError(f"{weights}: module {hf!r} has no llmkit counterpart in this model's family rules")
        if tensor.dim() != 2 or 1 not in tensor.shape:
            raise CheckpointError(f"{weights}: {key}: expected shape (out, 1) or (1, in), found {list(tensor.shape)}")
        ff = tensor.shape[0] == 1 and tensor.shape[1] != 1          # (1, in): scales the layer's input
        vector = tensor.reshape(-1)
        for ours, part, parts in reverse.get(hf, [(hf, None, 1)]):
            targets[ours] = {"ia3_l": vector if ff or part is None else vector.chunk(parts)[part].contiguous()}
            if ff:
                feedforward.append(ours)
    if not targets:
        raise CheckpointError(f"{weights}: no '*.ia3_l' tensor (found {sorted(tensors)[:4]})")
    return targets, {"feedforward_modules": feedforward, "targets": list(targets)}, rest
