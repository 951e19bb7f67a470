"""The registry of PEFT methods: name -> `Method`, and the shared option dataclass.

A method says how to build one named adapter on one base layer (`make_adapter`), which base layer
types it accepts, the closed-form count of its trainable parameters, and which Trainer callbacks
its handle must install (AdaLoRA's budget, DyLoRA's rank sampling). Everything else - target
selection, freezing, merging, multiple adapters, saving - is shared by the handle.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from torch import nn

from .errors import PeftError

TargetSpec = Union[None, str, Sequence[str]]


@dataclass
class AdapterConfig:
    """Options every low-rank method shares (method-specific ones live in subclasses).

    targets: a list of module-name suffixes (["q_proj", "v_proj"]), a regex string matched with
        re.fullmatch against full module names, "all-linear" (every nn.Linear of the model except
        its output head), or None for the method's default.
    layers: keep only modules inside these block indices (e.g. [0, 1]).
    modules_to_save: module names (suffixes) that train in full beside the adapters, e.g. a new
        classification head ["classifier"]; each gets a trainable per-adapter copy (as in HF peft).
    train_head: shorthand for modules_to_save=<the model's task head>.
    upcast_adapters: on a bf16/fp16 base, keep the adapter weights in float32 (as HF peft's
        autocast_adapter_dtype does): optimizer updates of ~1e-4 x |w| would round away in 8 or 11
        mantissa bits. Inputs are cast up for the adapter and its update cast back to the base dtype.
    """
    r: int = 8
    alpha: Optional[float] = None          # None -> alpha = r (scale 1)
    dropout: float = 0.0
    targets: TargetSpec = None
    layers: Optional[list[int]] = None
    modules_to_save: Optional[list[str]] = None
    train_head: bool = False
    upcast_adapters: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise PeftError(f"r={self.r!r}: expected a positive integer rank")
        if self.alpha is None:
            self.alpha = float(self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise PeftError(f"alpha={self.alpha!r}: expected a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise PeftError(f"dropout={self.dropout!r}: expected a probability in [0, 1)")
        if self.layers is not None and (not isinstance(self.layers, (list, tuple))
                                        or not all(isinstance(i, int) and i >= 0 for i in self.layers)):
            raise PeftError(f"layers={self.layers!r}: expected a list of non-negative block indices")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str)
                                                 or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise PeftError(f"modules_to_save={self.modules_to_save!r}: expected a list of module names")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["targets"], tuple):
            data["targets"] = list(data["targets"])
        return data


class Method:
    """Base class of a registered method. Subclasses set `name`, `config_class`, `default_targets`."""

    name: str = ""
    config_class: type = AdapterConfig
    default_targets: tuple[str, ...] = ("q_proj", "v_proj")
    layer_types: tuple[type, ...] = (nn.Linear,)

    def make_config(self, options: dict[str, Any]) -> AdapterConfig:
        known = [f.name for f in dataclasses.fields(self.config_class)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise PeftError(f"{self.name}: unknown option {key!r}{hint} (options: {sorted(known)})")
        return self.config_class(**options)

    def make_adapter(self, base: nn.Module, config: AdapterConfig) -> nn.Module:
        raise NotImplementedError

    def trainable_count(self, base: nn.Module, config: AdapterConfig) -> int:
        """Closed form of the adapter's trainable parameters on `base` (used by tests and reports)."""
        raise NotImplementedError

    def callbacks(self, handle) -> list:
        """Trainer callbacks the handle installs into `model.trainer_callbacks`."""
        return []


METHODS: dict[str, Method] = {}


def register(method_class: type) -> type:
    """Class decorator: register a `Method` subclass under its `name`."""
    instance = method_class()
    if not instance.name:
        raise PeftError(f"{method_class.__name__}: a registered method needs a non-empty `name`")
    METHODS[instance.name] = instance
    return method_class


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), sorted(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PeftError(f"method={name!r} is unknown{hint}: expected one of {sorted(METHODS)}")
    return METHODS[name]
