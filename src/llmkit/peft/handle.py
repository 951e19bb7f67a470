"""`PeftHandle`: what `llmkit.peft.apply` returns - one object to train, switch, merge and save
the adapters of a model.

State lives in the model (AdaptedLayer / SavedModule wrappers, see layers.py); the handle keeps
each adapter's method, options and resolved target names, so it can save and rebuild them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .errors import PeftError
from .layers import AdaptedLayer, SavedModule, set_submodule
from .lora import LoraAdapter, LoraConfig, LoraEmbeddingAdapter
from .registry import AdapterConfig, Method, get_method
from .targets import resolve_modules, select_targets, task_head

HANDLE_ATTR = "_llmkit_peft_handle"


@dataclass
class AdapterInfo:
    method: str
    config: AdapterConfig
    targets: list[str]                        # full module names
    saved: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)   # module -> rank, where not config.r


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
        self._callbacks: list = []
        self._base_requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        model.__dict__[HANDLE_ATTR] = self

    # ---- building ----------------------------------------------------------------------------
    def add_adapter(self, name: str = "default", method: str = "lora", **options) -> "PeftHandle":
        """Add a named adapter (any registered method) and make it the active one."""
        if not isinstance(name, str) or not name or "." in name:
            raise PeftError(f"adapter_name={name!r}: expected a non-empty name without dots")
        if name in self.adapters:
            raise PeftError(f"adapter_name={name!r} already exists (adapters: {list(self.adapters)}); "
                            "delete it first or pick another name")
        spec = get_method(method)
        rank_pattern = options.pop("rank_pattern", None) or {}
        config = spec.make_config(options)
        targets = select_targets(self.model, config.targets if config.targets is not None
                                 else list(spec.default_targets), config.layers, spec.layer_types, spec.name)
        tied = _tied_parameter_ids(self.model)
        for target in targets:
            self._attach(target, name, spec, _with_rank(config, rank_pattern.get(target)), tied)
        saved = list(config.modules_to_save or [])
        if config.train_head:
            saved += [h for h in task_head(self.model) if h not in saved]
        saved = resolve_modules(self.model, saved, "modules_to_save") if saved else []
        for module_name in saved:
            module = self.model.get_submodule(module_name)
            if not isinstance(module, SavedModule):
                module = SavedModule(module)
                set_submodule(self.model, module_name, module)
            module.add(name)
        self.adapters[name] = AdapterInfo(spec.name, config, targets, saved,
                                          {k: v for k, v in rank_pattern.items() if v != config.r})
        self._install_callbacks(spec)
        self.set_active(name)
        return self

    def _attach(self, target: str, name: str, spec: Method, config: AdapterConfig, tied: set[int]) -> None:
        module = self.model.get_submodule(target)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            module.tied_elsewhere = id(module.base_layer.weight) in tied
            set_submodule(self.model, target, module)
        adapter = spec.make_adapter(module.base_layer, config)
        if config.upcast_adapters and module.base_layer.weight.dtype in (torch.bfloat16, torch.float16):
            adapter.float()                  # AdaptedLayer casts inputs to the adapter's dtype
        module.adapters[name] = adapter

    def _install_callbacks(self, spec: Method) -> None:
        callbacks = getattr(self.model, "trainer_callbacks", None)
        if callbacks is None:
            callbacks = []
            self.model.__dict__["trainer_callbacks"] = callbacks
        for callback in spec.callbacks(self):
            if not any(type(c) is type(callback) for c in self._callbacks):
                self._callbacks.append(callback)
                callbacks.append(callback)

    # ---- iteration helpers -------------------------------------------------------------------
    def layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        for module_name, module in self.model.named_modules():
            if isinstance(module, AdaptedLayer):
                yield module_name, module

    def adapter_modules(self, name: Optional[str] = None) -> Iterator[tuple[str, AdaptedLayer, nn.Module]]:
        """(module name, layer, adapter) for adapter `name` (default: every active adapter)."""
        names = [name] if name is not None else self.active
        for module_name, layer in self.layers():
            for n in names:
                if n in layer.adapters:
                    yield module_name, layer, layer.adapters[n]

    def saved_modules(self) -> Iterator[tuple[str, SavedModule]]:
        for module_name, module in self.model.named_modules():
            if isinstance(module, SavedModule):
                yield module_name, module

    # ---- switching ---------------------------------------------------------------------------
    def set_active(self, names: Union[str, list[str]]) -> None:
        """Run (and train) these adapters; several at once sum their updates. Only active adapters
        keep requires_grad, so build the Trainer (its optimizer) after choosing."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise PeftError(f"adapters {unknown} do not exist: expected names from {list(self.adapters)}")
        if any(layer.merged for _, layer in self.layers()):
            raise PeftError("set_active: unmerge() first (merged adapters are baked into the weights)")
        self.active = names
        for _, layer in self.layers():
            layer.active = [n for n in names if n in layer.adapters]
        for _, module in self.saved_modules():
            module.active = next((n for n in names if n in module.copies), None)
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for _, layer in self.layers():
            for n in layer.active:
                for p in layer.adapters[n].parameters():
                    p.requires_grad_(True)
        for _, module in self.saved_modules():
            if module.active is not None:
                for p in module.copies[module.active].parameters():
                    p.requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise PeftError(f"adapter {name!r} does not exist: expected one of {list(self.adapters)}")
        self.unmerge()
        for module_name, layer in list(self.layers()):
            if name in layer.adapters:
                del layer.adapters[name]
            if not len(layer.adapters):              # the last adapter gone: the plain layer back
                set_submodule(self.model, module_name, layer.base_layer)
        for module_name, module in list(self.saved_modules()):
            if name in module.copies:
                del module.copies[name]
            if not len(module.copies):
                set_submodule(self.model, module_name, module.original_module)
        del self.adapters[name]
        remaining = [n for n in self.active if n != name] or list(self.adapters)[:1]
        if remaining:
            self.set_active(remaining)
        else:                                        # no adapter left: the model is plain again
            self.active = []
            for p in self.model.parameters():
                p.requires_grad_(self._base_requires_grad.get(id(p), True))
            self.model.__dict__.pop(HANDLE_ATTR, None)

    def add_weighted_adapter(self, weights: dict[str, float], name: str) -> None:
        """A new LoRA adapter with ΔW = sum_i w_i ΔW_i, exactly: A = [A'_1; ...; A'_n],
        B = [w_1 B'_1, ..., w_n B'_n] (rank sum r_i; B'_i carries adapter i's scale). Works across
        methods, since every adapter factors as ΔW = B' A'."""
        if name in self.adapters:
            raise PeftError(f"adapter_name={name!r} already exists")
        unknown = [n for n in weights if n not in self.adapters]
        if unknown or not weights:
            raise PeftError(f"weights={weights!r}: expected adapter names from {list(self.adapters)}")
        targets, ranks = [], {}
        with torch.no_grad():
            for module_name, layer in self.layers():
                parts = [(w, layer.adapters[n].factors()) for n, w in weights.items() if n in layer.adapters]
                if not parts:
                    continue
                B = torch.cat([w * b for w, (b, _) in parts], dim=1)                # (out, Σr)
                A = torch.cat([a for _, (_, a) in parts], dim=0)                    # (Σr, in)
                r = A.shape[0]
                if layer.is_embedding:
                    adapter = LoraEmbeddingAdapter(A.shape[1], B.shape[0], r, 1.0, device=A.device, dtype=A.dtype)
                else:
                    adapter = LoraAdapter(A.shape[1], B.shape[0], r, 1.0, device=A.device, dtype=A.dtype)
                adapter.lora_A.copy_(A)
                adapter.lora_B.copy_(B)
                layer.adapters[name] = adapter
                targets.append(module_name)
                ranks[module_name] = r
        if not targets:
            raise PeftError(f"weights={weights!r}: none of these adapters sits on any layer")
        r0 = max(ranks.values())
        config = LoraConfig(r=r0, scale=1.0, targets=targets)    # the scales are folded into B
        self.adapters[name] = AdapterInfo("lora", config, targets, [],
                                          {k: v for k, v in ranks.items() if v != r0})

    # ---- merging -----------------------------------------------------------------------------
    def merge(self) -> None:
        """W <- W + ΔW for every active adapter (inference without the extra matmuls)."""
        for _, layer in self.layers():
            layer.merge(layer.active)

    def unmerge(self) -> None:
        """W <- W - ΔW: the base weights back (to float rounding)."""
        for _, layer in self.layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters, put plain modules back, and return the model. The handle is
        spent afterwards; trained task heads (modules_to_save) replace the originals."""
        self.merge()
        for module_name, layer in list(self.layers()):
            set_submodule(self.model, module_name, layer.base_layer)
        for module_name, module in list(self.saved_modules()):
            kept = module.copies[module.active] if module.active is not None else module.original_module
            set_submodule(self.model, module_name, kept)
        for p in self.model.parameters():
            p.requires_grad_(self._base_requires_grad.get(id(p), True))
        callbacks = getattr(self.model, "trainer_callbacks", None)
        if callbacks is not None:
            callbacks[:] = [c for c in callbacks if c not in self._callbacks]
        self.model.__dict__.pop(HANDLE_ATTR, None)
        self.adapters, self.active = {}, []
        return self.model

    @contextmanager
    def disable(self):
        """Run the base model: every adapter and trained head off (merged ones are unmerged for the
        duration). Cheap, so the same model is its own frozen reference (DPO)."""
        merged = any(layer.merged for _, layer in self.layers())
        if merged:
            self.unmerge()
        wrappers = [m for _, m in self.layers()] + [m for _, m in self.saved_modules()]
        previous = [m.disabled for m in wrappers]
        for m in wrappers:
            m.disabled = True
        try:
            yield self.model
        finally:
            for m, flag in zip(wrappers, previous):
                m.disabled = flag
            if merged:
                self.merge()

    # ---- reporting and saving ----------------------------------------------------------------
    def trainable_parameters(self) -> TrainableParameters:
        seen, count, total = set(), 0, 0
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            count += p.numel() if p.requires_grad else 0
        return TrainableParameters(count, total)

    def expected_trainable(self, name: Optional[str] = None) -> int:
        """The closed-form count for adapter `name` (default: the active ones) + its saved modules."""
        names = [name] if name else self.active
        count = 0
        for n in names:
            info = self.adapters[n]
            spec = get_method(info.method)
            for target in info.targets:
                base = self.model.get_submodule(target).base_layer
                count += spec.trainable_count(base, _with_rank(info.config, info.rank_pattern.get(target)))
            for module_name in info.saved:
                count += sum(p.numel() for p in self.model.get_submodule(module_name).copies[n].parameters())
        return count

    def save(self, directory, format: str = "llmkit", adapter_name: Optional[str] = None):
        from .serialization import save_adapter
        return save_adapter(self, directory, format=format, adapter_name=adapter_name)

    def __repr__(self) -> str:
        info = {n: (a.method, len(a.targets)) for n, a in self.adapters.items()}
        return f"PeftHandle(adapters={info}, active={self.active})"


def _with_rank(config: AdapterConfig, rank: Optional[int]) -> AdapterConfig:
    if rank is None or rank == config.r:
        return config
    import dataclasses
    return dataclasses.replace(config, r=rank)


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {k for k, v in counts.items() if v > 1}


def handle_of(model: nn.Module) -> Optional[PeftHandle]:
    return model.__dict__.get(HANDLE_ATTR)
