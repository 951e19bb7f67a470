"""Tensor parallelism for inference: Megatron-style splits of a decoder's blocks over W ranks.

    model = shard_model(llmkit.build_model(config))        # under torchrun; in place, returns model
    logits = model(input_ids).logits                       # the same on every rank

The scheme is Megatron-LM's (Shoeybi et al., 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", section 3). A linear layer Y = X·A is split two ways:

- column split: A = [A_1 … A_W] by output columns, rank r computes Y_r = X·A_r from the whole
  (replicated) X and keeps only its slice of Y; no communication.
- row split: B = [B_1; …; B_W] by input rows, rank r holds the slice Y_r from the layer before and
  computes its partial Z_r = Y_r·B_r; Z = Σ_r Y_r·B_r is one all-reduce (sum). A bias of B is
  added once, to the sum, not W times.

Two linear layers with only per-element or per-head work between them need one all-reduce in all:

- attention: q_proj, k_proj, v_proj column-split by heads (rank r keeps query heads
  [r·h/W, (r+1)·h/W) and key/value heads [r·h_kv/W, (r+1)·h_kv/W), which are exactly the kv heads
  of its query heads under GQA), attention runs on the local heads, o_proj is row-split;
- MLP: gate_proj and up_proj column-split over d_ff (act(X·G_r) * X·U_r is per element), down_proj
  row-split.

So a block does one all-reduce after o_proj and one after down_proj; embeddings, norms and the
LM head stay replicated, and every rank ends a forward with the same (B, T, V) logits. The head
counts of each `Attention` become the local ones (h/W, h_kv/W), so its reshapes, GQA repeats and
KV cache (contiguous or paged, written through `cache.update(layer, k, v)`) all hold the rank's
local heads: size a cache with `local_kv_heads(model)`, not `config.kv_heads`. ALiBi masks, which
the stack builds for all h heads, are cut to the rank's heads (`query_head_slice(model)`) on their
way into attention; a cache that builds its own per-head bias must cut it the same way.

The splits use torch's own tensor parallelism: `parallelize_module` with `ColwiseParallel` /
`RowwiseParallel` over a 1-D `DeviceMesh` (DTensor weights; the activations between layers stay
plain local tensors, and RowwiseParallel's Partial -> Replicate is the all-reduce).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..model.models import CausalLM
from ..model.transformer import Transformer

MeshOrGroup = Union[DeviceMesh, "dist.ProcessGroup", None]

# The plan of one Block: module path -> style (ColwiseParallel: Shard(0) weight, output Shard(-1);
# RowwiseParallel: Shard(1) weight, input Shard(-1), output all-reduced to Replicate).
ATTENTION_PLAN = {"self_attn.q_proj": ColwiseParallel, "self_attn.k_proj": ColwiseParallel,
                  "self_attn.v_proj": ColwiseParallel, "self_attn.o_proj": RowwiseParallel}
MLP_PLAN = {"mlp.up_proj": ColwiseParallel, "mlp.down_proj": RowwiseParallel}
GATE_PLAN = {"mlp.gate_proj": ColwiseParallel}


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raise ValueError (naming the field, its value and what is expected) unless `model` is a
    decoder CausalLM whose blocks split evenly over `world_size` ranks. `shard_model` calls it;
    a launcher can call it before starting ranks."""
    if not isinstance(model, CausalLM) or not isinstance(getattr(model, "transformer", None), Transformer):
        raise ValueError(f"shard_model: model={type(model).__name__}: expected a decoder CausalLM "
                         "(the Transformer stack with an LM head)")
    config = model.config
    if config.is_encoder_decoder or not model.transformer.causal:
        raise ValueError(f"shard_model: model.transformer.causal={model.transformer.causal}: "
                         "expected a causal decoder stack")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"shard_model: world_size={world_size!r}: expected an integer >= 1")
    if getattr(model, "tensor_parallel_size", 1) != 1:
        raise ValueError(f"shard_model: model.tensor_parallel_size={model.tensor_parallel_size}: "
                         "expected an unsharded model (it is sharded already)")
    for field, value in (("n_heads", config.n_heads), ("n_kv_heads", config.kv_heads), ("d_ff", config.d_ff)):
        if value % world_size:
            raise ValueError(f"shard_model: {field}={value} is not divisible by the tensor-parallel "
                             f"world size {world_size}: expected a multiple of {world_size}")
    for i, block in enumerate(model.transformer.layers):
        attn, mlp = block.self_attn, block.mlp
        if block.cross_attn is not None:
            raise ValueError(f"shard_model: transformer.layers.{i}.cross_attn is set: expected a decoder-only block")
        if attn.kv_prefix is not None:
            raise ValueError(f"shard_model: transformer.layers.{i}.self_attn.kv_prefix is set: expected None "
                             "(a prefix adapter's keys/values hold all heads)")
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        linears = [(f"self_attn.{n}", getattr(attn, n)) for n in names]
        linears += [(f"mlp.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj") if hasattr(mlp, n)]
        for name, layer in linears:
            if type(layer) is not nn.Linear:
                raise ValueError(f"shard_model: transformer.layers.{i}.{name} is a {type(layer).__name__}: "
                                 "expected a plain nn.Linear (merge or remove adapters first)")


def shard_model(model: nn.Module, mesh_or_group: MeshOrGroup = None, *, src_rank: Optional[int] = 0) -> nn.Module:
    """Split every block of `model` over the ranks of `mesh_or_group` (module docstring), in place.

    mesh_or_group: a 1-D DeviceMesh, a ProcessGroup, or None for the default (torchrun) world,
    initialising torch.distributed from the environment if needed. src_rank: the rank whose full
    weights are scattered to the others (0, the default, makes the ranks agree even if their
    copies differ); None lets each rank cut its shard from its own copy, with no communication
    (every rank must then hold the same weights, e.g. from one checkpoint).
    Returns the model, whose forward signature is unchanged; `model.tensor_parallel_size`,
    `model.tensor_parallel_rank` and `model.tensor_parallel_mesh` record the split.
    """
    check_shardable(model, 1)                      # the model's kind first: no distributed setup for a wrong one
    mesh = _mesh(mesh_or_group, _device_type(model))
    world, rank = mesh.size(), mesh.get_local_rank()
    check_shardable(model, world)
    config = model.config
    n_heads, n_kv = config.n_heads, config.kv_heads
    for block in model.transformer.layers:
        plan = {**ATTENTION_PLAN, **MLP_PLAN, **(GATE_PLAN if hasattr(block.mlp, "gate_proj") else {})}
        parallelize_module(block, mesh, {name: style() for name, style in plan.items()}, src_data_rank=src_rank)
        attn = block.self_attn
        attn.n_heads, attn.n_kv_heads = n_heads // world, n_kv // world
        if config.positional == "alibi":
            attn.register_forward_pre_hook(_AlibiHeads(rank * attn.n_heads, attn.n_heads, n_heads), with_kwargs=True)
    model.tensor_parallel_size, model.tensor_parallel_rank = world, rank
    model.tensor_parallel_mesh = mesh                          # a plain attribute: no state_dict entry
    return model


def local_kv_heads(model: nn.Module) -> int:
    """Key/value heads a KV cache of this rank holds per layer (config.kv_heads unless sharded)."""
    return model.transformer.layers[0].self_attn.n_kv_heads


def query_head_slice(model: nn.Module) -> slice:
    """The global query heads this rank computes, [r·h/W, (r+1)·h/W) (all heads unless sharded):
    what a per-head term built for all h heads (ALiBi slopes, a paged ALiBi bias) must be cut to."""
    local = model.transformer.layers[0].self_attn.n_heads
    start = getattr(model, "tensor_parallel_rank", 0) * local
    return slice(start, start + local)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) parameter; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class _AlibiHeads:
    """Forward pre-hook: cut an ALiBi mask (B|1, h, Tq, Tk), built for all h heads, to this rank's."""

    def __init__(self, start: int, count: int, total: int):
        self.start, self.count, self.total = start, count, total

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("mask")
        if mask is not None and mask.dim() == 4 and mask.shape[1] == self.total:
            kwargs = {**kwargs, "mask": mask[:, self.start:self.start + self.count]}
        return args, kwargs


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def _mesh(mesh_or_group: MeshOrGroup, device_type: str) -> DeviceMesh:
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(f"shard_model: mesh_or_group has {mesh_or_group.ndim} dimensions: "
                             "expected a 1-D DeviceMesh")
        return mesh_or_group
    if mesh_or_group is not None:
        return DeviceMesh.from_group(mesh_or_group, device_type)
    if not dist.is_initialized() and not _launched():
        raise RuntimeError("shard_model: torch.distributed is not initialised and no torchrun environment "
                           "(RANK, WORLD_SIZE, MASTER_ADDR) is set: launch with torchrun or pass a DeviceMesh")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    return init_device_mesh(device_type, (world,))


def _launched() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
