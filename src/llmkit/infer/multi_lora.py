"""Multi-LoRA serving (issue 16): one batch, a different LoRA adapter per request (or none), the
base model run once.

Every adapter of the bank sits on the same frozen base model under its own name (LoRA, Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models"). Inside `bank.rows(adapter_index)`
each adapted layer computes, for every token t with adapter a = adapter_index[t],

    y_t = W x_t + s_a · B_a A_a x_t          (s_a = alpha_a / r_a; nothing added where a = -1)

so a batch mixing requests of several fine-tunes costs one base pass plus each token's own
rank-r_a term, as in Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", its SGMV
kernel) and S-LoRA (Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA
Adapters"). On an embedding the term is s_a · A_a^T[id_t] B_a^T. DyLoRA, AdaLoRA and LoRA-FA
adapters serve through their `factors()` (B', A') with B' A' = ΔW (the scale, AdaLoRA's Λ and rank
mask and DyLoRA's eval rank folded into B').

    bank = LoraBank(model, {"sql": "adapters/sql", "chat": "adapters/chat"})
    index = bank.indices(["sql", None, "chat"]).view(3, 1)      # (B, 1): one adapter per row
    with bank.rows(index):
        logits = model(input_ids).logits                          # (3, T, V)

`adapter_index` is a LongTensor broadcastable to the (B, T) token grid every adapted layer sees:
(B, 1) per row, (1, N) for N flattened tokens of several requests, or (B, T). Only additive
low-rank layer adapters can be mixed per token; prefix / prompt / bottleneck adapters, (IA)³
scalings, selective deltas, trained heads (modules_to_save) and adapters that overwrite base
layers are refused with an error naming the adapter and its method. Outside `rows()` the model is
an ordinary PEFT model (`bank.handle.set_active(...)`, `disable()`, training): the bank adds its
adapters to the model's handle and leaves the active set as it found it (none on a fresh model).
An adapter on the lm_head also works under `model(..., logits_index=mask)` (the engine's way:
the head sees only the sampled rows) when `rows(adapter_index, logits_index=mask)` is given the
same bool mask.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..peft import PeftError, PeftHandle, get_method, handle_of
from ..peft.layers import AdaptedLayer
from ..peft.lora import LoraAdapter, LoraEmbeddingAdapter
from ..peft.saving import read as read_records
from ..peft.serialization import WEIGHTS_FILE, AdapterRecord

ROUTER = "multi_lora_rows"         # the key the per-token router holds in a layer's adapters inside rows()
SERVABLE = ("lora", "dylora", "adalora", "lora_fa")   # the registered methods this covers (for messages)


class UnknownAdapterError(PeftError, KeyError):
    """A name that is not in the bank (both a ValueError and a KeyError)."""

    def __str__(self) -> str:                    # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LoraBank:
    """Named LoRA adapters on one base model, mixed per token inside `rows()`."""

    def __init__(self, model: nn.Module, adapters: Mapping[str, Union[str, Path]]):
        self.model = model
        self.handle: PeftHandle = handle_of(model) or PeftHandle(model)
        previous = list(self.handle.active)
        self.names: list[str] = []
        try:
            for name, directory in adapters.items():
                if not isinstance(name, str) or name == ROUTER:
                    raise PeftError(f"adapter name {name!r}: expected a string other than {ROUTER!r}")
                record = _record_for(model, name, directory)
                _check_record(record, directory)
                self.handle.attach(record, str(Path(directory) / WEIGHTS_FILE))
                self.names.append(name)
                _check_modules(self.handle, name, directory)
        except Exception:
            for name in reversed(self.names):
                if name in self.handle.adapters:
                    self.handle.delete_adapter(name)
            if self.handle.adapters:
                self.handle.set_active([n for n in previous if n in self.handle.adapters])
            raise
        if self.handle.adapters:
            self.handle.set_active(previous)         # the model as it was (a fresh one: nothing active)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"LoraBank(names={self.names})"

    def index(self, name: Optional[str]) -> int:
        """The 0-based slot of adapter `name`; -1 for None (the base model alone)."""
        if name is None:
            return -1
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownAdapterError(f"adapter {name!r} is not in the bank: expected None or one of "
                                      f"{self.names}") from None

    def indices(self, names: Sequence[Optional[str]]) -> torch.Tensor:
        """(len(names),) LongTensor of `index(n)` for each name (None -> -1)."""
        return torch.tensor([self.index(n) for n in names], dtype=torch.long)

    @contextmanager
    def rows(self, adapter_index, logits_index: Optional[torch.Tensor] = None) -> Iterator[nn.Module]:
        """Run the model with each token's own adapter: `adapter_index` (LongTensor, broadcastable
        to the (B, T) token grid; -1 = base only). `logits_index`: the bool (B, T) mask passed to the
        model as its `logits_index`, needed only when an adapter sits on the lm_head. Every other
        adapter of the handle (and any slot or trained head) is off for the duration; the previous
        state comes back on exit."""
        index = torch.as_tensor(adapter_index)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
            raise PeftError(f"adapter_index: expected an integer tensor, found dtype {index.dtype}")
        index = index.long()
        if index.numel() and (int(index.min()) < -1 or int(index.max()) >= len(self.names)):
            raise PeftError(f"adapter_index: values must lie in [-1, {len(self.names) - 1}] (-1 = no adapter, "
                            f"else a slot of {self.names}); found min {int(index.min())}, max {int(index.max())}")
        sites = [site for _, site in self.handle.sites()]
        if any(isinstance(s, AdaptedLayer) and s.merged for s in sites):
            raise PeftError("bank.rows: unmerge() first (merged adapters are baked into the shared weights)")
        if any(isinstance(s, AdaptedLayer) and ROUTER in s.adapters for s in sites):
            raise PeftError("bank.rows: already inside a rows() context of this model (they do not nest)")
        if logits_index is not None and torch.as_tensor(logits_index).dtype != torch.bool:
            raise PeftError("bank.rows: logits_index must be the bool (B, T) mask the model is given")
        routing = _Routing(index, logits_index)
        saved = [(s, list(s.active)) for s in sites]
        routed: list[AdaptedLayer] = []
        try:
            for site in sites:
                slots = [site.adapters[n] if isinstance(site, AdaptedLayer) and n in site.adapters else None
                         for n in self.names]
                if any(m is not None for m in slots):
                    site.adapters[ROUTER] = _RowRouter(slots, routing, site)
                    routed.append(site)
                    site.active = [ROUTER]
                else:
                    site.active = []
            yield self.model
        finally:
            for site, active in saved:
                site.active = active
            for site in routed:
                del site.adapters[ROUTER]


class _Routing:
    """The adapter index of one rows() context and, per token-grid shape, its groups: (slot, flat
    token positions) for each adapter present (positions None when every token has that one).
    Layers of the stack see a 2-D (B, T) grid; a 1-D (K,) grid is the lm_head under a bool
    `logits_index` with K rows set, whose tokens are index[mask]."""

    def __init__(self, index: torch.Tensor, logits_index: Optional[torch.Tensor] = None):
        self.index, self.logits_index = index, logits_index
        self.cache: dict[tuple[int, ...], list[tuple[int, Optional[torch.Tensor]]]] = {}

    def groups(self, grid: torch.Size, device: torch.device) -> list[tuple[int, Optional[torch.Tensor]]]:
        key = tuple(grid)
        if key not in self.cache:
            flat = self._head(key, device)
            if flat is None:
                try:
                    flat = torch.broadcast_to(self.index.to(device), key).reshape(-1)      # (N,)
                except RuntimeError:
                    raise PeftError(f"adapter_index of shape {list(self.index.shape)} does not broadcast to "
                                    f"the token grid {list(key)} an adapted layer sees (pass (B, 1), (1, N) or "
                                    "(B, T); for an adapted lm_head under logits_index, pass the same mask to "
                                    "rows(..., logits_index=))") from None
            present = [s for s in torch.unique(flat).tolist() if s >= 0]
            if len(present) == 1 and bool((flat == present[0]).all()):
                self.cache[key] = [(present[0], None)]       # one adapter for all: no gather
            else:
                self.cache[key] = [(s, (flat == s).nonzero().squeeze(1)) for s in present]
        return self.cache[key]

    def _head(self, key: tuple[int, ...], device: torch.device) -> Optional[torch.Tensor]:
        """index[mask] (K,) for the lm_head's (K,) grid under a logits_index mask, else None."""
        if self.logits_index is None or len(key) != 1:
            return None
        mask = torch.as_tensor(self.logits_index, device=device)
        if int(mask.sum()) != key[0]:
            return None
        return torch.broadcast_to(self.index.to(device), mask.shape)[mask]


class _RowRouter(nn.Module):
    """The one adapter an AdaptedLayer runs inside rows(): adds each token's own adapter term.

    Gather / scatter per adapter present (Punica's SGMV idea, S-LoRA's per-adapter batches):
    x_a = x[rows_a] (n_a, in), z = x_a A_a^T (n_a, r), out[rows_a] += s_a z B_a^T. Each token pays
    only its own rank-r term, and the cost does not grow with the number of adapters in the bank.
    Chosen on CPU by measurement (1 thread, r = 8, 3-4 adapters, d = 1024; µs per layer):
    N=8: 63 gather vs 47 masked vs 145 BGMV; N=64: 102 vs 215 vs 978; N=256: 459 vs 874 vs 3759.
    "Masked" runs every adapter over all tokens and zeroes the others' rank-r rows (or one gemm
    over the concatenated A's): n_adapters times the FLOPs, so it wins only at a handful of tokens.
    BGMV (Punica's per-token weight gather + bmm) copies an (r, in) matrix per token, which on a CPU
    costs more than the matmul it feeds. When every token has the same adapter the whole batch
    goes through one in-place addmm, no gather.
    No dropout: this is the serving path."""

    def __init__(self, slots: list[Optional[nn.Module]], routing: _Routing, layer: AdaptedLayer):
        super().__init__()
        self.slots, self.routing, self.is_embedding = slots, routing, layer.is_embedding   # slots: not submodules
        self.width = layer.base_layer.weight.shape[1] if self.is_embedding else layer.out_features
        ref = next(p for m in slots if m is not None for p in [*m.parameters(), *m.buffers()])
        # AdaptedLayer takes its fused `add_to` path when this matches x's dtype (else casts x to it)
        self.anchor = nn.Parameter(torch.empty(0, dtype=ref.dtype, device=ref.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The term alone (a float32 bank over a half-precision model, or an embedding's ids)."""
        grid = x.shape if self.is_embedding else x.shape[:-1]
        return self.add_to(torch.zeros(*grid, self.width, dtype=self.anchor.dtype, device=x.device), x)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n_out = out.shape[-1]
        groups = self.routing.groups(out.shape[:-1], out.device)
        flat_out = out.contiguous().view(-1, n_out)                                    # (N, out)
        flat_x = x.reshape(-1) if self.is_embedding else x.reshape(-1, x.shape[-1])    # (N,) | (N, in)
        for slot, rows in groups:
            module = self.slots[slot]
            if module is None:                       # this adapter does not adapt this layer
                continue
            B, A, scale = _factors(module)
            xs = flat_x if rows is None else flat_x.index_select(0, rows)
            if self.is_embedding:
                z = F.embedding(xs, A.t())                                               # (n_a, r)
            else:
                z = F.linear(xs, A.to(xs.dtype))                                         # (n_a, r)
            z, B = z.to(flat_out.dtype), B.to(flat_out.dtype)      # no-ops unless bank dtypes differ
            if rows is None:
                flat_out.addmm_(z, B.t(), alpha=scale)
            else:
                flat_out.index_add_(0, rows, F.linear(z, B), alpha=scale)               # scatter-add
        return flat_out.view(out.shape)


def _factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, s) with ΔW = s · B A: plain LoRA's own tensors (no scaled copy of B per call), else the
    method's `factors()` with the scale folded in."""
    if type(module).factors in (LoraAdapter.factors, LoraEmbeddingAdapter.factors):
        return module.lora_B, module.lora_A, float(module.scale)
    B, A = module.factors()
    return B, A, 1.0


def _record_for(model: nn.Module, name: str, directory) -> AdapterRecord:
    """The one adapter of `directory` (HF PEFT, or llmkit with one adapter or one called `name`),
    renamed `name`."""
    records = read_records(model, directory, None)
    if len(records) > 1:
        chosen = [r for r in records if r.name == name]
        if not chosen:
            raise PeftError(f"adapter {name!r}: {directory} holds adapters {sorted(r.name for r in records)}; "
                            "name the bank entry after one of them")
        records = chosen
    return dataclasses.replace(records[0], name=name, active=True)


def _refuse(name: str, method: str, directory, why: str) -> PeftError:
    return PeftError(f"adapter {name!r} ({directory}) is a {method!r} adapter: {why}; multi-LoRA serving "
                     f"mixes only additive low-rank layer adapters ({', '.join(SERVABLE)})")


def _check_record(record: AdapterRecord, directory) -> None:
    spec = get_method(record.method)
    if spec.placement != "layer":
        raise _refuse(record.name, record.method, directory,
                      f"it fills the model's {spec.slot or spec.placement!r} slot, not a per-token low-rank term")
    if record.saved:
        raise _refuse(record.name, record.method, directory,
                      f"it trains whole modules (modules_to_save {sorted(record.saved)}), which rows cannot share")
    if record.base:
        raise _refuse(record.name, record.method, directory,
                      f"it overwrites base layers {sorted(record.base)} that every row shares")


def _check_modules(handle: PeftHandle, name: str, directory) -> None:
    """Every module of adapter `name` is an additive low-rank term of a wrapped layer."""
    for site_name, site, module in handle.adapter_modules(name):
        bad = (not isinstance(site, AdaptedLayer) or getattr(module, "scales", None) or getattr(module, "patches", None)
               or not hasattr(module, "factors"))
        if bad:
            method = handle.adapters[name].method
            handle.delete_adapter(name)
            kind = ("scales activations" if getattr(module, "scales", None) else
                    "patches the base parameters" if getattr(module, "patches", None) else "is no low-rank term")
            raise _refuse(name, method, directory, f"at {site_name} it {kind}")
