"""`PeftHandle`: what `llmkit.peft.apply` returns - one object to train, switch, merge and save
the adapters of a model, and the seams a training job plugs in (`callbacks()`, `wrap_loss()`).

State lives in the model, in adapter sites (model/slots.py's protocol): an AdaptedLayer wraps a
target layer, an AdapterSlot fills a model slot, a SavedModule holds the trained copies of a head.
The handle walks the sites alike to freeze, switch, disable, save, load and delete, and keeps each
adapter's method, options and site names. Saving turns adapters into plain `AdapterRecord`s for a
codec (serialization.py, peft_format.py, peft_prompt_format.py); loading attaches records through
one shape-checked copy (saving.py).
"""
from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from ..io.errors import CheckpointError
from ..model.slots import AdapterSite, AdapterSlot
from . import saving
from .errors import PeftError
from .layers import AdaptedLayer, SavedModule, set_submodule
from .registry import AdapterConfig, Method, SiteContext, get_method
from .serialization import WEIGHTS_FILE, AdapterRecord
from .targets import resolve_modules, select_targets, task_head

HANDLE_ATTR = "_llmkit_peft_handle"


@dataclass
class AdapterInfo:
    method: str
    config: AdapterConfig
    targets: list[str]                        # full names of its sites (wrapped layers, filled slots)
    saved: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)   # site -> rank, where not config.r


class TrainableParameters:
    """`count, percent = handle.trainable_parameters()`; `.total` is every parameter of the model."""

    def __init__(self, count: int, total: int):
        self.count, self.total = count, total
        self.percent = 100.0 * count / max(total, 1)

    def __iter__(self):
        return iter((self.count, self.percent))

    def __repr__(self) -> str:
        return f"trainable params: {self.count:,} of {self.total:,} ({self.percent:.4f}%)"


class PeftHandle:
    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, AdapterInfo] = {}
        self.active: list[str] = []
        self._callbacks: dict[str, list] = {}    # method -> its Trainer callbacks, made once
        self._base_requires_grad = {id(p): p.requires_grad for p in model.parameters()}

    # ---- building ----------------------------------------------------------------------------
    def add_adapter(self, name: str = "default", method: str = "lora", **options) -> "PeftHandle":
        """Add a named adapter (any registered method) and make it the active one."""
        spec = get_method(method)
        rank_pattern = options.pop("rank_pattern", None) or {}
        config = spec.make_config(options)
        targets = select_targets(self.model, spec.default_targets if config.targets is None else config.targets,
                                 config.layers, spec, config)
        if spec.placement == "slot":
            targets = [f"{t}.{slot}" for t in targets for slot in spec.slots_for(config)]
        saved = list(config.modules_to_save or [])
        if config.train_head and task_head(self.model) not in saved:
            saved.append(task_head(self.model))
        saved = resolve_modules(self.model, saved, "modules_to_save") if saved else []
        # a module that trains in full (modules_to_save) needs no adapter inside it
        inside = [t for t in targets if any(t.startswith(m + ".") for m in saved)]
        if inside and len(inside) == len(targets):
            raise PeftError(f"{method}: every target {inside[:4]} sits inside modules_to_save {saved}, which "
                            "train in full anyway; target other modules")
        targets = [t for t in targets if t not in inside]
        return self._build(name, spec, config, targets, saved, rank_pattern)

    def _build(self, name: str, spec: Method, config: AdapterConfig, targets: list[str], saved: list[str],
               rank_pattern: dict[str, int], loaded: Optional[dict[str, dict]] = None) -> "PeftHandle":
        if not isinstance(name, str) or not name or "." in name:
            raise PeftError(f"adapter_name={name!r}: expected a non-empty name without dots")
        if name in self.adapters:
            raise PeftError(f"adapter_name={name!r} already exists (adapters: {list(self.adapters)}); "
                            "delete it first or pick another name")
        if spec.placement == "model":
            raise PeftError(f"{spec.name}: placement='model' has no adapter site yet")
        r = getattr(config, "r", None)
        self.adapters[name] = AdapterInfo(spec.name, config, targets, saved,
                                          {k: v for k, v in rank_pattern.items() if v != r})
        self.model.__dict__[HANDLE_ATTR] = self
        try:
            tied, shared = _tied_parameter_ids(self.model), {}
            placed = [self._site(target, spec, tied) for target in targets]
            bases = [base for _, base in placed]
            for i, (target, (site, base)) in enumerate(zip(targets, placed)):
                adapter = spec.adapter_for(base, _with_rank(config, rank_pattern.get(target)),
                                           SiteContext(target, i, len(targets), shared, bases,
                                                       (loaded or {}).get(target), self.model))
                weight = next(base.parameters(), None)
                if config.upcast_adapters and weight is not None and weight.dtype in (torch.bfloat16, torch.float16):
                    adapter.float()              # the site casts inputs to the adapter's dtype
                site.named[name] = adapter
            for module_name in saved:
                module = self.model.get_submodule(module_name)
                if not isinstance(module, SavedModule):
                    module = SavedModule(module)
                    set_submodule(self.model, module_name, module)
                module.copies[name] = copy.deepcopy(module.original_module)
            self.set_active(name)
        except Exception:
            self.delete_adapter(name)
            raise
        return self

    def _site(self, path: str, spec: Method, tied: set[int]) -> tuple[AdapterSite, nn.Module]:
        """The site at `path` (made if needed) and the module its adapter is built on."""
        if spec.placement == "slot":
            host_name, _, slot = path.rpartition(".")
            host = self.model.get_submodule(host_name)
            site = getattr(host, slot)
            if site is None:
                site = AdapterSlot(host.adapter_slots[slot])
                setattr(host, slot, site)
            elif not isinstance(site, AdapterSlot):
                raise PeftError(f"{path}: the slot holds a {type(site).__name__} set by hand; expected None "
                                "or an AdapterSlot (set it to None to let PEFT own it)")
            return site, host
        site = self.model.get_submodule(path)
        if not isinstance(site, AdaptedLayer):
            site = AdaptedLayer(site)
            site.tied_elsewhere = id(site.base_layer.weight) in tied
            set_submodule(self.model, path, site)
        return site, site.base_layer

    # ---- iteration helpers -------------------------------------------------------------------
    def sites(self) -> Iterator[tuple[str, AdapterSite]]:
        """(module name, site) of every adapter site: wrapped layers, filled slots, saved modules."""
        for module_name, module in self.model.named_modules():
            if isinstance(module, AdapterSite):
                yield module_name, module

    def layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        return ((n, s) for n, s in self.sites() if isinstance(s, AdaptedLayer))

    def adapter_modules(self, name: Optional[str] = None) -> Iterator[tuple[str, AdapterSite, nn.Module]]:
        """(site name, site, adapter) for adapter `name` (default: every active adapter), saved
        modules aside."""
        names = [name] if name is not None else self.active
        for module_name, site in self.sites():
            if not isinstance(site, SavedModule):
                yield from ((module_name, site, site.named[n]) for n in names if n in site.named)

    # ---- switching ---------------------------------------------------------------------------
    def set_active(self, names: Union[str, list[str]]) -> None:
        """Run (and train) these adapters; several at once combine (layers sum their updates, slots
        combine by their rule). Only active adapters keep requires_grad, so build the Trainer (its
        optimizer) after choosing."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise PeftError(f"adapters {unknown} do not exist: expected names from {list(self.adapters)}")
        if any(layer.merged for _, layer in self.layers()):
            raise PeftError("set_active: unmerge() first (merged adapters are baked into the weights)")
        self.active = names
        for p in self.model.parameters():
            p.requires_grad_(False)
        for _, site in self.sites():
            site.set_active(names)
            for n in site.active:
                site.named[n].requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise PeftError(f"adapter {name!r} does not exist: expected one of {list(self.adapters)}")
        self.unmerge()
        for module_name, site in list(self.sites()):
            if name in site.named:
                del site.named[name]
                site.set_active(site.active)
                if not len(site.named):              # the last adapter gone: the plain module back
                    set_submodule(self.model, module_name, site.unload())
        del self.adapters[name]
        remaining = [n for n in self.active if n != name] or list(self.adapters)[:1]
        if remaining:
            self.set_active(remaining)
        else:                                        # no adapter left: the model is plain again
            self._release()

    def _release(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(self._base_requires_grad.get(id(p), True))
        self.model.__dict__.pop(HANDLE_ATTR, None)
        self.adapters, self.active = {}, []

    def add_weighted_adapter(self, weights: dict[str, float], name: str) -> None:
        """A new LoRA adapter with ΔW = sum_i w_i ΔW_i, exactly: A = [A'_1; ...; A'_n],
        B = [w_1 B'_1, ..., w_n B'_n] (rank sum r_i; B'_i carries adapter i's scale). Works across
        layer methods, since every one factors as ΔW = B' A'. The active adapters stay active."""
        if not weights or any(n not in self.adapters for n in weights):
            raise PeftError(f"weights={weights!r}: expected adapter names from {list(self.adapters)}")
        targets = {}
        with torch.no_grad():
            for module_name, layer in self.layers():
                parts = [(w, layer.adapters[n].factors()) for n, w in weights.items() if n in layer.adapters]
                if parts:
                    targets[module_name] = {"lora_B": torch.cat([w * b for w, (b, _) in parts], dim=1),   # (out, Σr)
                                            "lora_A": torch.cat([a for _, (_, a) in parts], dim=0)}    # (Σr, in)
        if not targets:
            raise PeftError(f"weights={weights!r}: none of these adapters sits on any layer")
        ranks = {m: t["lora_A"].shape[0] for m, t in targets.items()}
        r0, active = max(ranks.values()), self.active
        self.attach(AdapterRecord(name, "lora", {"r": r0, "scale": 1.0, "targets": list(targets)}, targets,
                                  rank_pattern={m: r for m, r in ranks.items() if r != r0}))
        self.set_active(active)

    # ---- merging -----------------------------------------------------------------------------
    def merge(self) -> None:
        """W <- W + ΔW for every active layer adapter (inference without the extra matmuls)."""
        for _, layer in self.layers():
            layer.merge(layer.active)

    def unmerge(self) -> None:
        """W <- W - ΔW: the base weights back (to float rounding)."""
        for _, layer in self.layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters, put plain modules back, and return the model. The handle is
        spent afterwards; trained task heads (modules_to_save) replace the originals, and a slot
        keeps its active adapter as a plain slot module."""
        self.merge()
        for module_name, site in list(self.sites()):
            set_submodule(self.model, module_name, site.unload())
        self._release()
        return self.model

    def fold(self, name: Optional[str] = None) -> None:
        """Replace each adapter that trains through a reparameterisation by its inference form
        (prefix tuning: P = MLP(E) computed once, the MLP dropped). Outputs stay the same."""
        for adapter_name in [name] if name else list(self.adapters):
            folded = False
            for _, site, module in list(self.adapter_modules(adapter_name)):
                if hasattr(module, "folded"):
                    site.named[adapter_name] = module.folded()
                    folded = True
            info = self.adapters[adapter_name]
            if folded and hasattr(info.config, "projection"):
                info.config = dataclasses.replace(info.config, projection=False)
        self.set_active(self.active)

    def mergeable(self) -> bool:
        """Whether merge_and_unload() leaves a plain model: every active adapter sits in a layer
        and folds into its weight (the LoRA family, (IA)³); slot adapters (bottlenecks, prompts,
        prefixes, routers) stay modules of their own."""
        return all(isinstance(site, AdaptedLayer) and (hasattr(a, "delta_weight") or hasattr(a, "merge_into"))
                   for _, site, a in self.adapter_modules())

    @contextmanager
    def detached(self):
        """The model as the base model for saving: wrapped layers back to their base layers, slots
        emptied, trained heads (modules_to_save) in place of the originals; restored afterwards."""
        if any(layer.merged for _, layer in self.layers()):
            raise PeftError("detached: unmerge() first (merged adapters are baked into the weights)")
        sites = list(self.sites())
        for module_name, site in sites:
            set_submodule(self.model, module_name, site.unload() if isinstance(site, SavedModule)
                          else getattr(site, "base_layer", None))
        try:
            yield self.model
        finally:
            for module_name, site in sites:
                set_submodule(self.model, module_name, site)

    @contextmanager
    def disable(self):
        """Run the base model: every adapter, slot and trained head off (merged ones are unmerged
        for the duration). Cheap, so the same model is its own frozen reference (DPO)."""
        merged = any(layer.merged for _, layer in self.layers())
        if merged:
            self.unmerge()
        sites = [s for _, s in self.sites()]
        previous = [s.disabled for s in sites]
        for s in sites:
            s.disabled = True
        try:
            yield self.model
        finally:
            for s, flag in zip(sites, previous):
                s.disabled = flag
            if merged:
                self.merge()

    # ---- training seams ----------------------------------------------------------------------
    def callbacks(self) -> list:
        """The Trainer callbacks the adapters' methods need (AdaLoRA's rank budget, DyLoRA's rank
        sampling), made once per method and acting on its active adapters:
        `Trainer(model, handle.wrap_loss(loss_fn), data, callbacks=handle.callbacks())`."""
        methods = dict.fromkeys(info.method for info in self.adapters.values())
        for method in methods:
            if method not in self._callbacks:
                self._callbacks[method] = get_method(method).callbacks(self)
        return [c for method in methods for c in self._callbacks[method]]

    def wrap_loss(self, loss_fn: Callable) -> Callable:
        """loss_fn(model, batch) -> (loss, metrics) with the active methods' penalty terms added:
        L' = L + Σ_m P_m (Method.penalty, e.g. AdaLoRA's γ Σ R(P, Q)), each P_m also reported as
        metrics["penalty/<method>"]. So the Trainer backpropagates, clips and logs L'."""
        def wrapped(model, batch):
            loss, metrics = loss_fn(model, batch)
            metrics = dict(metrics or {})
            for method in dict.fromkeys(self.adapters[n].method for n in self.active):
                penalty = get_method(method).penalty(self)
                if penalty is not None:
                    loss = loss + penalty
                    metrics[f"penalty/{method}"] = penalty.detach()
            return loss, metrics
        return wrapped

    # ---- reporting, saving and loading -------------------------------------------------------
    def trainable_parameters(self) -> TrainableParameters:
        params = list(self.model.parameters())                   # shared (tied) ones once
        return TrainableParameters(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))

    def expected_trainable(self, name: Optional[str] = None) -> int:
        """The closed-form count for adapter `name` (default: the active ones) + its saved modules."""
        count = 0
        for n in [name] if name else self.active:
            info = self.adapters[n]
            spec = get_method(info.method)
            bases = [self._site(target, spec, set())[1] for target in info.targets]
            for i, (target, base) in enumerate(zip(info.targets, bases)):
                count += spec.count_for(base, _with_rank(info.config, info.rank_pattern.get(target)),
                                        SiteContext(target, i, len(info.targets), bases=bases, model=self.model))
            for module_name in info.saved:
                count += sum(p.numel() for p in self.model.get_submodule(module_name).copies[n].parameters())
        return count

    def record(self, name: str) -> AdapterRecord:
        """Adapter `name` as plain data for a codec (training-only buffers, an adapter class's
        `training_state` such as AdaLoRA's importance averages, left out)."""
        info = self.adapters[name]
        shared = self._shared_keys(name, info.targets)

        def tensors(path: str) -> dict[str, torch.Tensor]:
            module = self.model.get_submodule(path).named[name]
            skip = set(getattr(module, "training_state", ())) | shared.get(path, set())
            return {k: t.detach().contiguous().cpu() for k, t in module.state_dict().items() if k not in skip}
        return AdapterRecord(name, info.method, info.config.to_dict(), {t: tensors(t) for t in info.targets},
                             {m: tensors(m) for m in info.saved}, dict(info.rank_pattern), name in self.active)

    def _shared_keys(self, name: str, paths: list[str]) -> dict[str, set[str]]:
        """site -> state keys of adapter `name` that an earlier site holds too (a parameter the
        sites share, such as prefix tuning's MLP): saved and loaded once, at the first site."""
        seen, out = set(), {}
        for path in paths:
            state = self.model.get_submodule(path).named[name].state_dict(keep_vars=True)
            out[path] = {k for k, t in state.items() if id(t) in seen}
            seen |= {id(t) for t in state.values()}
        return out

    def save(self, directory, format: str = "llmkit", adapter_name: Optional[str] = None) -> Path:
        """Write adapter files: format="llmkit" every adapter of any method, exactly
        (serialization.py); "peft" one adapter as HF PEFT files (LORA for the LoRA family,
        PROMPT_TUNING, PREFIX_TUNING, IA3)."""
        return saving.save(self, directory, format, adapter_name)

    def attach(self, record: AdapterRecord, source: str = WEIGHTS_FILE) -> None:
        """Add adapter `record.name` from plain data (what a codec read): its sites, then every
        tensor copied in, names and shapes checked; on any mismatch nothing stays attached."""
        spec = get_method(record.method)
        try:
            self._build(record.name, spec, spec.make_config(dict(record.config)), list(record.targets),
                        list(record.saved), record.rank_pattern, record.targets)
        except (AttributeError, KeyError) as exc:
            raise CheckpointError(f"{source}: adapter {record.name!r} sits on modules this "
                                  f"{type(self.model).__name__} lacks ({exc})") from None
        try:
            shared = self._shared_keys(record.name, list(record.targets))
            for path, tensors in [*record.targets.items(), *record.saved.items()]:
                module = self.model.get_submodule(path).named[record.name]
                optional = set(getattr(module, "training_state", ())) | shared.get(path, set())
                saving.copy_checked(module, tensors, f"{source}: {path}", optional)
            for path, tensors in record.base.items():
                module = self.model.get_submodule(path)
                saving.copy_checked(getattr(module, "base_layer", module), tensors, f"{source}: {path}")
        except Exception:
            self.delete_adapter(record.name)
            raise

    def __repr__(self) -> str:
        info = {n: (a.method, len(a.targets)) for n, a in self.adapters.items()}
        return f"PeftHandle(adapters={info}, active={self.active})"


def load(model: nn.Module, directory, *, adapter_name: Optional[str] = None) -> PeftHandle:
    """Attach adapters saved by `handle.save` (either format) or by HF peft's save_pretrained."""
    records = saving.read(model, directory, adapter_name)
    handle = handle_of(model) or PeftHandle(model)
    for record in records:
        handle.attach(record, str(Path(directory) / WEIGHTS_FILE))
    active = [r.name for r in records if r.active]
    if active:
        handle.set_active(active)
    return handle


def _with_rank(config: AdapterConfig, rank: Optional[int]) -> AdapterConfig:
    return config if rank is None or rank == getattr(config, "r", rank) else dataclasses.replace(config, r=rank)


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {k for k, v in counts.items() if v > 1}


def handle_of(model: nn.Module) -> Optional[PeftHandle]:
    return model.__dict__.get(HANDLE_ATTR)
