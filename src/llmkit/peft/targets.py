"""Which modules of a model get an adapter: by name suffix, regex, "all-linear", and block index.

- a list of suffixes: a module matches when its full name equals a suffix or ends with "." + suffix;
- a string: a regular expression that must match the full module name (re.fullmatch);
- "all-linear": every nn.Linear outside the model's output heads (an llmkit model declares them in
  `head_names`; for any other module every Linear but the last one registered);
- None (a slot method's default): every module that hosts the method's slot;
- layers=[i, ...]: only modules inside these blocks (an llmkit model's `blocks()`; for any other
  module, names like "layers.3.", "layer.3.", "h.3.", "blocks.3.").

A slot method's targets name hosts (["self_attn"] for a kv_prefix). A target that matches nothing
is an error listing the most similar module names (difflib).
"""
from __future__ import annotations

import difflib
import inspect
import re
from typing import Callable, Optional

from torch import nn

from .errors import PeftError
from .layers import AdaptedLayer
from .registry import Method, TargetSpec

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_INTERNAL = re.compile(r"(?:^|\.)(?:base_layer|adapters|original_module|copies)(?:\.|$)")


def block_index(model: nn.Module) -> Callable[[str], Optional[int]]:
    """module name -> index of the block it sits in (None outside every block)."""
    blocks = getattr(model, "blocks", None)
    if not inspect.ismethod(blocks):
        return lambda name: int(m.group(1)) if (m := _LAYER_INDEX.search(name)) else None
    index = {id(b): i for i, b in enumerate(blocks())}
    prefixes = [(name + ".", index[id(m)]) for name, m in model.named_modules() if id(m) in index]
    return lambda name: next((i for p, i in prefixes if (name + ".").startswith(p)), None)


def _suggest(wanted: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(wanted.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.3)
    close += [n for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.5) if n not in close]
    return f"similar module names: {close}" if close else f"module names end in: {leaves[:20]}"


def select_targets(model: nn.Module, targets: TargetSpec, layers: Optional[list[int]], spec: Method,
                   config=None) -> list[str]:
    """Full names of the modules `spec` adapts (layers, or a slot method's hosts), in model order."""
    named = visible_modules(model)
    if targets is None:
        chosen = spec.narrow([n for n, m in named.items() if spec.accepts(m, config)])
    elif isinstance(targets, str) and targets == "all-linear":
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
        index = block_index(model)
        chosen = [n for n in chosen if index(n) in set(layers)]
        if not chosen:
            raise PeftError(f"layers={layers!r}: no targeted module sits in these blocks "
                            f"(block indices seen: {sorted({index(n) for n in named} - {None})})")
    hosts = [n for n, m in named.items() if spec.accepts(m, config)]
    if not hosts:
        site = spec.needs or (f"a module with the {spec.slot!r} slot" if spec.placement == "slot"
                              else " or ".join(t.__name__ for t in spec.layer_types))
        raise PeftError(f"{spec.name}: {type(model).__name__} has no site this method needs: expected {site}")
    wrong = [n for n in chosen if not spec.accepts(named[n], config)]
    if wrong or not chosen:
        takes = [t.__name__ for t in spec.layer_types] if spec.placement == "layer" else f"hosts of {spec.slot!r}"
        kinds = sorted({type(named[n]).__name__ for n in wrong})
        raise PeftError(f"{spec.name}: targets={targets!r} selects {wrong[:4] or 'nothing'} {kinds}; this "
                        f"method takes {takes} (here: {[n for n, m in named.items() if spec.accepts(m, config)][:6]} ...)")
    return chosen


def visible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module names a user targets: an already adapted layer counts as its base layer, and the
    wrappers' insides (base_layer, adapters, saved copies) are hidden."""
    return {name: module.base_layer if isinstance(module, AdaptedLayer) else module
            for name, module in model.named_modules() if name and not _INTERNAL.search(name)}


def _heads(model: nn.Module) -> Optional[list[str]]:
    """The output heads a model declares (`head_names`, task head first) that it has; None if it
    declares none."""
    names = getattr(model, "head_names", None)
    return None if names is None else [h for h in names if getattr(model, h, None) is not None]


def _all_linear(model: nn.Module, named: dict[str, nn.Module]) -> list[str]:
    linears = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    heads = _heads(model)
    if heads is None:
        chosen = linears[:-1]
    else:
        chosen = [n for n in linears if not any(n == h or n.startswith(h + ".") for h in heads)]
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


def task_head(model: nn.Module) -> str:
    """The head a `train_head=True` keeps trainable: the first of the model's `head_names`."""
    heads = _heads(model)
    if not heads:
        raise PeftError(f"train_head=True: {type(model).__name__} declares no output head (head_names="
                        f"{getattr(model, 'head_names', None)!r}); name it with modules_to_save=[...]")
    return heads[0]
