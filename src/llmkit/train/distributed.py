"""Running the same Trainer under `torchrun --nproc_per_node N`: torch.distributed, nothing home-made.

- `setup(kind, device)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the
  process group: gloo on CPU, nccl on CUDA (one GPU per local rank).
- `wrap_model(model, kind)`: "ddp" -> DistributedDataParallel (Li et al., 2020): every rank holds
  the full model and gradients are averaged by all-reduce; "fsdp" -> FSDP2 `fully_shard` (Zhao et
  al., 2023) per transformer block and then the root: parameters, gradients and optimizer state are
  sharded across ranks as DTensors, gathered per block for the forward/backward.
- Data sharding is the data objects' job: they take (rank, world_size) in their constructors,
  typically from `rank_and_world_size()` before the Trainer exists.
- Gradient accumulation skips the gradient reduction on all but the last micro-batch
  (`DDP.no_sync()`, FSDP2 `set_requires_gradient_sync(False)`).

Teardown: with gloo, `destroy_process_group()` while the peer is still inside its own teardown can
abort the process ("terminate called without an active exception", exit -6, seen about 1 run in 3
with torch 2.13 on CPU); a barrier before destroying removes the race.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError


@dataclass
class DistContext:
    kind: str = "none"            # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False      # True when setup() created the process group (and will destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of this process: from the process group if one exists, else torchrun's
    environment, else (0, 1). Use it to shard data before building the Trainer."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device='cuda': expected a visible CUDA device, found none "
                          "(use device='cpu' or 'auto')")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"TrainConfig.precision='fp16' on device {device.type!r}: expected a CUDA device "
                          "(fp16 needs a GradScaler on a GPU); use precision='bf16' on a CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("TrainConfig.precision='bf16': this GPU does not support bfloat16; use 'fp16'")


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors in a batch (dict / list / tuple, nested) moved to `device`; other values kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def setup(kind: str, device: str = "auto") -> DistContext:
    """Join (or reuse) the process group for `kind` and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "none":
        if world_size > 1:
            raise ConfigError(f"TrainConfig.distributed='none' but this process was launched by torchrun "
                              f"with WORLD_SIZE={world_size}: expected 'ddp' or 'fsdp'")
        return DistContext(device=resolve_device(device))
    if not launched_by_torchrun() and not dist.is_initialized():
        warnings.warn(f"TrainConfig.distributed={kind!r} but not launched by torchrun (no RANK/WORLD_SIZE "
                      "in the environment): training as a single process", stacklevel=3)
        return DistContext(device=resolve_device(device))
    torch_device = resolve_device(device, local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        owns = True
    return DistContext(kind=kind, rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, device=torch_device, owns_group=owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if `setup` created it (barrier first: see the module docstring)."""
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        ctx.owns_group = False


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module the training step calls: the model itself, a DDP wrapper, or the model sharded in
    place by FSDP2. Either way `model` keeps its parameter names (state dicts need no prefix)."""
    if not ctx.active:
        return model
    if ctx.kind == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if ctx.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        # DDP broadcasts rank 0's weights at construction; fully_shard does not (each rank keeps its
        # slice of its own copy), so make every rank start from rank 0's initialization.
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)
        for block in model.blocks() if hasattr(model, "blocks") else []:   # llmkit models declare them
            fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"TrainConfig.distributed={ctx.kind!r}: expected one of ['none', 'ddp', 'fsdp']")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this forward/backward only if `enabled` (the last micro-batch)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):                         # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):      # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reduce_mean(values: list[float], ctx: DistContext, op: str = "mean") -> list[float]:
    """Average (or max, op="max") a list of floats over ranks; every rank passes the same length."""
    if not ctx.active or not values:
        return list(values)
    comm_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        tensor /= ctx.world_size
    return tensor.tolist()


def gather_json(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's JSON-able `obj`, in rank order, on every rank (bytes through all_gather: no pickle)."""
    if not ctx.active:
        return [obj]
    comm_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=comm_device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=comm_device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=comm_device)
    padded[: data.numel()] = data
    chunks = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(chunk[: int(n.item())].tolist()).decode("utf-8")) for chunk, n in zip(chunks, sizes)]
