"""How a family's Hugging Face tensor names map onto llmkit's, and config.json field helpers.

A converter lists one `Rule` per llmkit tensor. Most rules are a rename. GPT-2 needs two more
ideas: its Conv1D layers store weights as (in, out), so they are transposed, and its attention
fuses q, k and v into one `c_attn` tensor, so each of q/k/v is one `part` of three along the
output dimension.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class Rule:
    ours: str                       # llmkit state-dict key
    theirs: str                     # canonical HF key (as transformers writes it)
    transpose: bool = False         # HF stores (in, out): GPT-2 Conv1D
    part: Optional[int] = None      # index of this tensor inside a fused HF tensor...
    parts: int = 1                  # ...split into `parts` equal chunks along the output dim

    def hf_shape(self, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(ours_shape)
        if self.part is not None:
            shape[0] *= self.parts
        return tuple(reversed(shape)) if self.transpose and len(shape) == 2 else tuple(shape)

    def to_ours(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.transpose and tensor.dim() == 2:
            tensor = tensor.t()
        if self.part is not None:
            tensor = tensor.chunk(self.parts, dim=0)[self.part]
        return tensor.contiguous()

    @staticmethod
    def to_theirs(rules_and_tensors: list[tuple["Rule", torch.Tensor]]) -> torch.Tensor:
        """Rebuild one HF tensor from the llmkit tensors of its parts (ordered by part)."""
        ordered = sorted(rules_and_tensors, key=lambda rt: rt[0].part or 0)
        tensor = torch.cat([t for _, t in ordered], dim=0) if len(ordered) > 1 else ordered[0][1]
        if ordered[0][0].transpose and tensor.dim() == 2:
            tensor = tensor.t()
        return tensor.contiguous()


def linear(ours: str, theirs: str, bias: bool, **kw) -> list[Rule]:
    """Rules for a Linear/LayerNorm-like module: weight, and bias if it has one."""
    rules = [Rule(f"{ours}.weight", f"{theirs}.weight", **kw)]
    if bias:
        rules.append(Rule(f"{ours}.bias", f"{theirs}.bias", **kw))
    return rules


_LEGACY_SUFFIXES = ((re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias"))


def normalize_key(key: str, prefixes: tuple[str, ...]) -> str:
    """Canonical form for matching: drop a known model prefix, map LayerNorm.gamma/beta."""
    for prefix in prefixes:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for pattern, repl in _LEGACY_SUFFIXES:
        key = pattern.sub(repl, key)
    return key


# ---- config.json fields ------------------------------------------------------------------------

def field(hf: dict, key: str, source: Path, kind: type | tuple = (int,), default: Any = ...) -> Any:
    """hf[key], checked against `kind`; a clear CheckpointError names the file and the key."""
    if key not in hf or hf[key] is None:
        if default is ...:
            raise CheckpointError(f"{source}: key {key!r} is missing (expected {_kind_name(kind)})")
        return default
    value = hf[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CheckpointError(f"{source}: key {key!r}: expected {_kind_name(kind)}, found {value!r}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def choice(hf: dict, key: str, source: Path, allowed: dict, default: Any = ...) -> Any:
    """Map an HF string option (e.g. hidden_act) onto llmkit's, with a clear error."""
    value = field(hf, key, source, str, default)
    if value not in allowed:
        raise CheckpointError(f"{source}: key {key!r}: expected one of {sorted(allowed)}, found {value!r}")
    return allowed[value]


def single_token_id(hf: dict, key: str, source: Path) -> Optional[int]:
    """eos_token_id may be an int or a list in HF configs; llmkit keeps the first."""
    value = hf.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and not isinstance(value, int):
        raise CheckpointError(f"{source}: key {key!r}: expected an int or a list of ints, found {value!r}")
    return value


def read_rope(hf: dict, source: Path) -> tuple[float, Optional[dict]]:
    """(theta, scaling) from either the old fields (`rope_theta`, `rope_scaling`) or the new
    `rope_parameters` dict (transformers >= 5). The new field wins when both are present."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = field(params, "rope_theta", source, float, default=hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = field(hf, "rope_theta", source, float, default=10000.0)
        scaling = dict(hf["rope_scaling"]) if isinstance(hf.get("rope_scaling"), dict) else None
    if scaling is not None:
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    return float(theta), scaling


def write_rope(theta: float, scaling: Optional[dict]) -> dict:
    """Both spellings, so old and new transformers versions read the file."""
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": dict(scaling) if scaling else None,
            "rope_parameters": params}
