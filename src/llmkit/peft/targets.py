"""Which modules of a model get an adapter: by name suffix, regex, "all-linear", and block index.

- a list of suffixes: a module matches when its full name equals a suffix or ends with "." + suffix;
- a string: a regular expression that must match the full module name (re.fullmatch);
- "all-linear": every nn.Linear except the output head (for llmkit models every Linear inside
  the `transformer` stack; for other modules every Linear but the last one registered);
- layers=[i, ...]: only modules inside blocks with these indices (names like "layers.3.", "layer.3.",
  "h.3.", "blocks.3.").

A target that matches nothing is an error listing the most similar module names (difflib).
"""
from __future__ import annotations

import difflib
import re
from typing import Optional

from torch import nn

from .errors import PeftError
from .registry import TargetSpec

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# Heads of llmkit task models: "all-linear" never adapts them.
HEAD_NAMES = ("lm_head", "mlm_head", "classifier", "nsp_head", "value_head", "projection", "pooler")


def layer_index(name: str) -> Optional[int]:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _suggest(wanted: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(wanted.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.3)
    close += [n for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.5) if n not in close]
    return f"similar module names: {close}" if close else f"module names end in: {leaves[:20]}"


def select_targets(model: nn.Module, targets: TargetSpec, layers: Optional[list[int]],
                   layer_types: tuple[type, ...], method: str) -> list[str]:
    """Full names of the modules to adapt, in model order."""
    named = visible_modules(model)
    candidates = [n for n, m in named.items() if isinstance(m, layer_types)]
    if isinstance(targets, str) and targets == "all-linear":
        chosen = _all_linear(model, named)
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise PeftError(f"targets={targets!r}: not a valid regular expression ({exc})") from exc
        chosen = [n for n in named if pattern.fullmatch(n)]
        if not chosen:
            raise PeftError(f"targets={targets!r}: the regex matches no module name; "
                            f"{_suggest(targets, list(named))}")
    elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        chosen = []
        for suffix in targets:
            hits = [n for n in named if n == suffix or n.endswith("." + suffix)]
            if not hits:
                raise PeftError(f"targets: {suffix!r} matches no module of {type(model).__name__}; "
                                f"{_suggest(suffix, list(named))}")
            chosen += hits
        chosen = [n for n in named if n in set(chosen)]          # model order, no duplicates
    else:
        raise PeftError(f"targets={targets!r}: expected a list of module-name suffixes, a regex string "
                        "or 'all-linear'")
    if layers is not None:
        chosen = [n for n in chosen if layer_index(n) in set(layers)]
        if not chosen:
            raise PeftError(f"layers={layers!r}: no targeted module sits in these blocks "
                            f"(block indices seen: {sorted({layer_index(n) for n in named} - {None})})")
    wrong = [n for n in chosen if not isinstance(named[n], layer_types)]
    if wrong:
        kinds = sorted({type(named[n]).__name__ for n in wrong})
        raise PeftError(f"{method}: targets {wrong[:4]} are {kinds}; this method adapts "
                        f"{[t.__name__ for t in layer_types]} only (adaptable here: {candidates[:6]} ...)")
    return chosen


def visible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module names a user targets: an already adapted layer counts as its base layer, and the
    wrappers' insides (base_layer, adapters, saved copies) are hidden."""
    from .layers import AdaptedLayer
    out = {}
    for name, module in model.named_modules():
        if not name or _INTERNAL.search(name):
            continue
        out[name] = module.base_layer if isinstance(module, AdaptedLayer) else module
    return out


_INTERNAL = re.compile(r"(?:^|\.)(?:base_layer|adapters|original_module|copies)(?:\.|$)")


def _all_linear(model: nn.Module, named: dict[str, nn.Module]) -> list[str]:
    linears = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    if hasattr(model, "transformer") and hasattr(model, "config"):        # an llmkit model
        chosen = [n for n in linears if n.startswith("transformer.")]
    else:
        chosen = [n for n in linears if n.split(".")[0] not in HEAD_NAMES][:-1] if linears else []
    if not chosen:
        raise PeftError(f"targets='all-linear': {type(model).__name__} has no nn.Linear besides its output head")
    return chosen


def resolve_modules(model: nn.Module, names: list[str], what: str) -> list[str]:
    """modules_to_save suffixes -> full names (each must match)."""
    named = list(visible_modules(model))
    out = []
    for suffix in names:
        hits = [n for n in named if n == suffix or n.endswith("." + suffix)]
        # keep the outermost match only (a head and its inner Linear both end in the suffix chain)
        hits = [h for h in hits if not any(h != o and h.startswith(o + ".") for o in hits)]
        if not hits:
            raise PeftError(f"{what}: {suffix!r} matches no module of {type(model).__name__}; "
                            f"{_suggest(suffix, named)}")
        out += hits
    return out


def task_head(model: nn.Module) -> list[str]:
    """The head a `train_head=True` should keep trainable."""
    heads = [n for n in HEAD_NAMES if n not in ("pooler",) and getattr(model, n, None) is not None]
    if not heads:
        raise PeftError(f"train_head=True: {type(model).__name__} has no known head "
                        f"(looked for {list(HEAD_NAMES)}); name it with modules_to_save=[...]")
    return heads[:1]
