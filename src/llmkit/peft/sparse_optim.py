"""Optimizer bookkeeping when a selection changes during training: Fish-DiP re-selects entries
every T steps, diff pruning swaps its dense delta for the kept entries. Any torch optimizer works:
its per-parameter state tensors of the parameter's shape (AdamW's exp_avg, exp_avg_sq; SGD's
momentum_buffer) follow the entries they belong to, and scalar state (step) is kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _moved(state: dict, old_numel: int, gather: torch.Tensor, scatter: Optional[torch.Tensor], size: int) -> dict:
    """State tensors shaped like the old flat parameter: new[scatter] = old[gather] (new entries 0)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel() == old_numel and value.dim() > 0:
            flat = value.reshape(-1)
            if scatter is None:
                out[key] = flat[gather].clone()
            else:
                new = flat.new_zeros(size)
                new[scatter] = flat[gather]
                out[key] = new
        else:
            out[key] = value
    return out


@torch.no_grad()
def remap_entries(optimizer: Optional[torch.optim.Optimizer], param: nn.Parameter, values: torch.Tensor,
                  gather: torch.Tensor, scatter: torch.Tensor) -> None:
    """`param` (k,) takes new contents `values` (k,) in place; its optimizer state moves along:
    entry `scatter[j]` of the new state is entry `gather[j]` of the old, the rest start at zero."""
    k = param.numel()
    if optimizer is not None and param in optimizer.state:
        optimizer.state[param] = _moved(optimizer.state[param], k, gather, scatter, k)
    param.copy_(values)


@torch.no_grad()
def replace_parameter(optimizer: Optional[torch.optim.Optimizer], old: nn.Parameter, new: nn.Parameter,
                      gather: Optional[torch.Tensor] = None) -> None:
    """Swap `old` for `new` in the optimizer's groups (same group, so the same lr and weight decay);
    with `gather`, new's state is old's state at those flat entries, else new starts fresh."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, None)
                if state is not None and gather is not None:
                    optimizer.state[new] = _moved(state, old.numel(), gather, None, new.numel())
                return


@torch.no_grad()
def drop_parameter(optimizer: Optional[torch.optim.Optimizer], old: nn.Parameter) -> None:
    """Take `old` out of the optimizer (its groups and state)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not old]
    optimizer.state.pop(old, None)
