"""Structured pruning: remove whole FFN channels or attention heads, so the matrices shrink.

The same number of channels (heads) goes from every layer, so `config.d_ff` (`n_heads`) stays
one number and the smaller model saves and reloads in Hugging Face format (io.hf).

Importance of FFN channel c (the c-th input of down_proj):
- with calibration: I_c = mean_t |a_tc| · ‖W_down[:, c]‖₂, the mean size of the channel's
  contribution to the block output (a first-order proxy in the spirit of LLM-Pruner, Ma et al.
  2023, and of Wanda's |W|·‖X‖ applied to a whole column);
- without: I_c = ‖W_down[:, c]‖₂ · ‖W_up[c, :]‖₂ (· ‖W_gate[c, :]‖₂ if gated): the weight norms
  that bound the channel's gain from block input to block output (data-free magnitude pruning).

Attention: the unit is a key/value group — one kv head with the query heads that share it (GQA,
Ainslie et al. 2023; MHA: a single head). Its importance is the sum, over the o_proj input
columns of its query heads, of the same quantities: mean_t |a_tc| · ‖W_o[:, c]‖₂ with
calibration; without, ‖W_o[:, group columns]‖_F · ‖W_v[group rows, :]‖_F (the OV circuit's norm
bound, cf. Michel et al. 2019, "Are Sixteen Heads Really Better than One?", for head pruning).

With calibration the driver (calibrate.layerwise) goes block by block, so the importances of
block i are measured on the outputs of the already pruned blocks before it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import nn

from .calibrate import check_calibration, layerwise
from .errors import CompressError


class MeanAbsAccumulator:
    """mean_t |x_tc| per input column c (in,), in float64 so the sum stays exact for many tokens."""

    def __init__(self, in_features: int, device=None):
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)    # (in,)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])                                                 # (n, in)
        self.total += x.double().abs().sum(0)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()                              # (in,)


# ---- slicing ---------------------------------------------------------------------------------

def _linear(module, name: str, where: str) -> nn.Linear:
    linear = getattr(module, name, None)
    if not isinstance(linear, nn.Linear):
        raise CompressError(f"{where}: {name} is {type(linear).__name__}: expected a plain nn.Linear "
                            "(merge or remove adapters before structured pruning)")
    return linear


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep output features `index` (the Linear's weight rows and bias entries)."""
    linear.weight = nn.Parameter(linear.weight.data[index].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[index].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(index)


def _keep_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep input features `index` (weight columns; the bias is per output, untouched)."""
    linear.weight = nn.Parameter(linear.weight.data[:, index].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(index)


def shrink_ffn(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep the intermediate channels `keep` (sorted ids): gate/up rows, down_proj columns."""
    for name in ("gate_proj", "up_proj"):
        if getattr(mlp, name, None) is not None:
            _keep_rows(getattr(mlp, name), keep)
    _keep_columns(mlp.down_proj, keep)


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature ids of whole heads: head h -> h·hd .. h·hd + hd − 1."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def shrink_heads(attn: nn.Module, keep_groups: torch.Tensor) -> None:
    """Keep the kv groups `keep_groups` (sorted ids) and their query heads: q/k/v rows, o columns."""
    rep = attn.n_heads // attn.n_kv_heads                        # query heads per kv head
    q_heads = (keep_groups.unsqueeze(1) * rep + torch.arange(rep)).reshape(-1)
    q_features = _head_columns(q_heads, attn.head_dim)
    kv_features = _head_columns(keep_groups, attn.head_dim)
    _keep_rows(attn.q_proj, q_features)
    _keep_rows(attn.k_proj, kv_features)
    _keep_rows(attn.v_proj, kv_features)
    _keep_columns(attn.o_proj, q_features)
    attn.n_heads, attn.n_kv_heads = len(q_heads), len(keep_groups)


# ---- importance ------------------------------------------------------------------------------

def ffn_importance(mlp: nn.Module, mean_abs: Optional[torch.Tensor]) -> torch.Tensor:
    """I_c per intermediate channel (d_ff,) (module docstring)."""
    down = mlp.down_proj.weight.detach().float()                                      # (d, d_ff)
    score = down.norm(dim=0)                                                          # (d_ff,)
    if mean_abs is not None:
        return score * mean_abs
    for name in ("gate_proj", "up_proj"):
        if getattr(mlp, name, None) is not None:
            score = score * getattr(mlp, name).weight.detach().float().norm(dim=1)     # (d_ff,)
    return score


def head_importance(attn: nn.Module, mean_abs: Optional[torch.Tensor]) -> torch.Tensor:
    """Importance per kv group (n_kv,) (module docstring)."""
    n_kv, hd = attn.n_kv_heads, attn.head_dim
    o = attn.o_proj.weight.detach().float()                                           # (d, nh·hd)
    if mean_abs is not None:
        per_feature = o.norm(dim=0) * mean_abs                                        # (nh·hd,)
        return per_feature.reshape(n_kv, -1).sum(1)                                   # group's heads are contiguous
    v = attn.v_proj.weight.detach().float()                                           # (nkv·hd, d)
    o_groups = o.reshape(o.shape[0], n_kv, -1).pow(2).sum(dim=(0, 2)).sqrt()           # (n_kv,)
    v_groups = v.reshape(n_kv, hd, -1).pow(2).sum(dim=(1, 2)).sqrt()                   # (n_kv,)
    return o_groups * v_groups


def _keep_top(score: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted ids of the len(score) − remove highest scores (sorted, so channel order is kept)."""
    return score.topk(len(score) - remove).indices.sort().values


# ---- drivers ---------------------------------------------------------------------------------

def _with_config(model: nn.Module, **changes) -> None:
    """Give every module that holds the model's config a copy with `changes` (the old object may
    be shared with other models, so it is not mutated)."""
    old = model.config
    new = dataclasses.replace(old, **changes)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def _remove_units(model, remove: int, sublayer: str, names: tuple[str, ...], importance, shrink, *,
                  calibration, chunk_size: int, progress: bool, desc: str) -> dict:
    """Shrink `sublayer` of every block to its units of highest `importance(sub, mean_abs or None)`
    by `shrink(sub, keep)`. With calibration, mean_abs is of the input of `names[-1]` (the output
    projection), measured layer by layer; without, None (weights only). Returns the report's
    shared fields."""
    for i, block in enumerate(model.blocks()):
        for name in names:
            _linear(getattr(block, sublayer), name, f"{desc}: block {i}")
    before, kept = sum(p.numel() for p in model.parameters()), {}

    def shrink_block(block, mean_abs):
        sub = getattr(block, sublayer)
        keep = _keep_top(importance(sub, mean_abs), remove)
        kept[len(kept)] = keep.tolist()
        shrink(sub, keep)

    with torch.no_grad():
        if calibration is None:
            for block in model.blocks():
                shrink_block(block, None)
        else:
            suffix = f".{sublayer}.{names[-1]}"

            def observe(path, linear):
                return MeanAbsAccumulator(linear.in_features, linear.weight.device) if path.endswith(suffix) else None

            def update(index, block, stats):
                (_, acc), = stats.values()
                shrink_block(block, acc.mean())

            layerwise(model, check_calibration(calibration, desc), observe, update, chunk_size=chunk_size,
                      progress=progress, desc=desc)
    return {"removed": remove, "kept": kept, "parameters_before": before,
            "parameters_after": sum(p.numel() for p in model.parameters())}


def prune_ffn_channels(model: nn.Module, fraction: float, calibration: Optional[torch.Tensor] = None, *,
                       chunk_size: int = 8, progress: bool = False) -> dict:
    """Remove floor(fraction · d_ff) intermediate channels from every block's MLP, in place.
    Returns {"removed": per layer, "d_ff": new, "kept": {block index: channel ids},
    "parameters_before", "parameters_after"}."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise CompressError(f"prune_ffn_channels: fraction={fraction!r}: expected a fraction in [0, 1)")
    d_ff = model.config.d_ff
    remove = int(fraction * d_ff)
    names = ("gate_proj", "up_proj", "down_proj") if model.config.gated_mlp else ("up_proj", "down_proj")
    report = _remove_units(model, remove, "mlp", names, ffn_importance, shrink_ffn, calibration=calibration,
                           chunk_size=chunk_size, progress=progress, desc="prune_ffn_channels")
    _with_config(model, d_ff=d_ff - remove)
    return {**report, "d_ff": d_ff - remove}


def _groups_to_remove(amount, n_kv: int) -> int:
    """A fraction in [0, 1) of the kv groups (floor), or a count in [0, n_kv)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise CompressError(f"prune_attention_heads: amount={amount!r}: expected a fraction in [0, 1) "
                            f"or a count of kv groups in [0, {n_kv})")
    if isinstance(amount, int):
        if not 0 <= amount < n_kv:
            raise CompressError(f"prune_attention_heads: amount={amount}: expected a count of kv groups "
                                f"in [0, {n_kv}) (at least one group stays)")
        return amount
    if not 0 <= amount < 1:
        raise CompressError(f"prune_attention_heads: amount={amount!r}: expected a fraction in [0, 1)")
    return int(amount * n_kv)


def prune_attention_heads(model: nn.Module, amount: Union[float, int], calibration: Optional[torch.Tensor] = None,
                          *, chunk_size: int = 8, progress: bool = False) -> dict:
    """Remove `amount` kv groups (a fraction of them, or a count) from every block's self-attention,
    with their query heads, in place. Returns {"removed": groups per layer, "n_heads", "n_kv_heads",
    "kept": {block index: kv group ids}, "parameters_before", "parameters_after"}."""
    config = model.config
    if config.positional == "alibi":
        raise CompressError("prune_attention_heads: positional='alibi': ALiBi slopes depend on the head count, "
                            "so removing heads changes the others; expected another position scheme")
    if any(getattr(b, "cross_attn", None) is not None for b in model.blocks()):
        raise CompressError(f"prune_attention_heads: model={type(model).__name__}: cross-attention shares "
                            "n_heads with self-attention; expected a decoder-only or encoder model")
    if config.family in ("gpt2", "bert", "bart"):
        raise CompressError(f"prune_attention_heads: family={config.family!r}: its Hugging Face config has no "
                            "head_dim (it is d_model / n_heads), so the smaller model could not be saved; "
                            "expected a llama or mistral model (or family='custom', saved in llmkit's format)")
    n_kv, rep = config.kv_heads, config.n_heads // config.kv_heads
    remove = _groups_to_remove(amount, n_kv)
    report = _remove_units(model, remove, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), head_importance,
                           shrink_heads, calibration=calibration, chunk_size=chunk_size, progress=progress,
                           desc="prune_attention_heads")
    n_kv_new = n_kv - remove
    # head_dim is made explicit: d_model // n_heads no longer gives it once heads are gone.
    _with_config(model, n_heads=n_kv_new * rep, head_dim=config.dim_per_head,
                 n_kv_heads=None if config.n_kv_heads is None else n_kv_new)
    return {**report, "n_heads": n_kv_new * rep, "n_kv_heads": n_kv_new}
