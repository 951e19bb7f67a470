"""The registry of PEFT methods: name -> `Method`, and the option dataclasses.

A method says where its adapters sit (`placement`: "layer" wraps each target layer in an
AdaptedLayer; "slot" fills the model slot `slot` of each target host, see model/slots.py;
"model" wraps the whole model, for methods still to come), how to build one named adapter
(`make_adapter`), the closed-form count of its trainable parameters, and its two seams into
training: Trainer callbacks (`callbacks`: AdaLoRA's budget, DyLoRA's rank sampling) and a penalty
term of the loss (`penalty`: AdaLoRA's orthogonality). Everything else - target selection,
freezing, switching, merging, several adapters, saving - the handle shares.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .errors import PeftError

TargetSpec = Union[None, str, Sequence[str]]
PLACEMENTS = ("layer", "slot", "model")


@dataclass
class SiteContext:
    """Where one adapter is being built: its site's module path, its index among the `total`
    sites of this adapter, a dict shared by all of them (for parameters the sites share), the
    base modules of all of them (for a selection made over every target at once: PaFi), and, when
    an adapter is loaded from a file, the tensors saved for this site (a selection made from data,
    such as a Fisher mask, is read back, not recomputed)."""
    path: str
    index: int = 0
    total: int = 1
    shared: dict = dataclasses.field(default_factory=dict)
    bases: list = dataclasses.field(default_factory=list)      # every site's base module, in order
    saved: Optional[dict] = None                               # name -> tensor, when loading
    model: Optional[nn.Module] = None                          # the whole model (scores from data)


@dataclass
class AdapterConfig:
    """Options every method shares (method-specific ones live in subclasses).

    targets: a list of module-name suffixes (["q_proj", "v_proj"]), a regex string matched with
        re.fullmatch against full module names, "all-linear" (every nn.Linear of the model except
        its output heads), or None for the method's default. A slot method's targets are hosts.
    layers: keep only modules inside these block indices (e.g. [0, 1]).
    modules_to_save: module names (suffixes) that train in full beside the adapters, e.g. a new
        classification head ["classifier"]; each gets a trainable per-adapter copy (as in HF peft).
    train_head: shorthand for modules_to_save=<the model's task head>.
    upcast_adapters: on a bf16/fp16 base, keep the adapter weights in float32 (as HF peft's
        autocast_adapter_dtype does): optimizer updates of ~1e-4 x |w| would round away in 8 or 11
        mantissa bits. Inputs are cast up for the adapter and its output cast back.
    """
    targets: TargetSpec = None
    layers: Optional[list[int]] = None
    modules_to_save: Optional[list[str]] = None
    train_head: bool = False
    upcast_adapters: bool = True

    def __post_init__(self) -> None:
        if self.layers is not None and (not isinstance(self.layers, (list, tuple))
                                        or not all(isinstance(i, int) and i >= 0 for i in self.layers)):
            raise PeftError(f"layers={self.layers!r}: expected a list of non-negative block indices")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str)
                                                 or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise PeftError(f"modules_to_save={self.modules_to_save!r}: expected a list of module names")

    def to_dict(self) -> dict[str, Any]:
        """The options as plain data; fields with repr=False (runtime state) are left out."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}


@dataclass
class LowRankConfig(AdapterConfig):
    """A rank-r update ΔW = B A scaled by alpha / r (LoRA and its relatives), dropout on its input."""
    r: int = 8
    alpha: Optional[float] = None          # None -> alpha = r (scale 1)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise PeftError(f"r={self.r!r}: expected a positive integer rank")
        if self.alpha is None:
            self.alpha = float(self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise PeftError(f"alpha={self.alpha!r}: expected a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise PeftError(f"dropout={self.dropout!r}: expected a probability in [0, 1)")


@dataclass
class SelectionConfig(AdapterConfig):
    """How many entries a selective method trains: `density`, a fraction of the targeted weights'
    entries, or an exact `count` (give one)."""
    density: Optional[float] = None
    count: Optional[int] = None

    def selects(self) -> bool:
        """Whether this config selects entries (Child-tuning_D trains every entry instead)."""
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.selects():
            return
        if (self.density is None) == (self.count is None):
            raise PeftError(f"density={self.density!r}, count={self.count!r}: give exactly one of the two")
        if self.density is not None and (isinstance(self.density, bool) or not isinstance(self.density, (int, float))
                                         or not 0 < self.density <= 1):
            raise PeftError(f"density={self.density!r}: expected a fraction in (0, 1]")
        if self.count is not None and (not isinstance(self.count, int) or isinstance(self.count, bool)
                                       or self.count <= 0):
            raise PeftError(f"count={self.count!r}: expected a positive integer")

    def budget(self, total: int) -> int:
        """The number of entries to select out of `total`."""
        k = self.count if self.count is not None else max(1, math.floor(self.density * total))
        if k > total:
            raise PeftError(f"count={k}: the targeted weights hold only {total:,} entries")
        return k


@dataclass
class DataConfig(AdapterConfig):
    """For methods that select from data (Fisher information, sensitivity): `batches`, an iterable
    of training batches, and `loss_fn(model, batch) -> loss` or `(loss, metrics)` (the Trainer's
    signature). Both are runtime inputs, never saved; `num_batches` is how many batches are drawn.
    A loaded adapter reads its selection from the file and needs neither."""
    batches: Any = dataclasses.field(default=None, repr=False)
    loss_fn: Any = dataclasses.field(default=None, repr=False)
    num_batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches <= 0:
            raise PeftError(f"num_batches={self.num_batches!r}: expected a positive number of batches "
                            "(a Fisher or sensitivity over zero batches is undefined)")


class Method:
    """Base class of a registered method. Subclasses set `name`, `config_class`, `placement` and
    `default_targets` (+ `layer_types` for "layer", `slot` for "slot")."""

    name: str = ""
    config_class: type = AdapterConfig
    placement: str = "layer"
    slot: str = ""                                         # "slot": a key of its hosts' adapter_slots
    default_targets: TargetSpec = ("q_proj", "v_proj")     # None: every module that takes it
    layer_types: tuple[type, ...] = (nn.Linear,)
    needs: str = ""                                        # what a host must be, for error messages

    def make_config(self, options: dict[str, Any]) -> AdapterConfig:
        known = [f.name for f in dataclasses.fields(self.config_class)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise PeftError(f"{self.name}: unknown option {key!r}{hint} (options: {sorted(known)})")
        return self.config_class(**options)

    def accepts(self, module: nn.Module, config: Optional[AdapterConfig] = None) -> bool:
        """Whether `module` can take this method's adapter: a layer of `layer_types`, or a host of
        `slot` (`config`, when given, may widen or narrow it: BitFit's add_missing)."""
        if self.placement == "slot":
            return self.slot in getattr(module, "adapter_slots", {})
        return isinstance(module, self.layer_types)

    def slots_for(self, config: AdapterConfig) -> list[str]:
        """The slots of each host this adapter fills (a Houlsby adapter fills two)."""
        return [self.slot]

    def narrow(self, names: list[str]) -> list[str]:
        """The hosts / layers taken when `targets` is not given, from every one that accepts
        (a prompt goes into the first stack only: BART's encoder)."""
        return names

    def make_adapter(self, base: nn.Module, config: AdapterConfig) -> nn.Module:
        """One adapter on `base`: the wrapped layer ("layer") or the slot's host module ("slot")."""
        raise NotImplementedError

    def trainable_count(self, base: nn.Module, config: AdapterConfig) -> int:
        """Closed form of the adapter's trainable parameters on `base` (used by tests and reports)."""
        raise NotImplementedError

    def adapter_for(self, base: nn.Module, config: AdapterConfig, site: SiteContext) -> nn.Module:
        """What the handle calls: `make_adapter`, unless the method needs to know the site
        ((IA)³: the FFN scales its input) or shares parameters across sites (prefix tuning's MLP)."""
        return self.make_adapter(base, config)

    def count_for(self, base: nn.Module, config: AdapterConfig, site: SiteContext) -> int:
        """`trainable_count` for one site; shared parameters are counted at site 0 only."""
        return self.trainable_count(base, config)

    def callbacks(self, handle) -> list:
        """Trainer callbacks this method's adapters need; made once per handle, see handle.callbacks()."""
        return []

    def penalty(self, handle) -> Optional[torch.Tensor]:
        """A term added to the training loss by handle.wrap_loss (None: no term)."""
        return None


METHODS: dict[str, Method] = {}


def register(method_class: type) -> type:
    """Class decorator: register a `Method` subclass under its `name`."""
    instance = method_class()
    if not instance.name:
        raise PeftError(f"{method_class.__name__}: a registered method needs a non-empty `name`")
    if instance.placement not in PLACEMENTS or (instance.placement == "slot") != bool(instance.slot):
        raise PeftError(f"{method_class.__name__}: placement={instance.placement!r}, slot={instance.slot!r}: "
                        f"expected a placement in {list(PLACEMENTS)}, with a slot name exactly for 'slot'")
    METHODS[instance.name] = instance
    return method_class


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), sorted(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PeftError(f"method={name!r} is unknown{hint}: expected one of {sorted(METHODS)}")
    return METHODS[name]
