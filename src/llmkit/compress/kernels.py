"""CPU matmuls for weight-only quantized layers: y = x W'^T with W' the dequantized weight.

Kernels, chosen per weight by `prepare`:

- "int8pack": torch's `aten._weight_int8pack_mm(x, W8, s)` = x (W8 * s[:, None])^T, for 8-bit codes
  with one grid per output channel (W8 = q - 128 as int8). An asymmetric grid adds a rank-one term:
      (q - z) s = (q - 128) s + (128 - z) s   so   y = int8pack(x) + sum_i(x_i) * ((128 - z) s)^T.
- "int4pack": torch's `aten._weight_int4pack_mm_for_cpu(x, P, g, SZ)`, which computes with
  w = (q - 8) * S + Z per group (SZ (in / g, out, 2) holds S and Z; checked in the tests). Ours is
  w = (q - z) * s, so S = s and Z = (8 - z) * s (zero for the symmetric grid, z = 8). It needs
  out % 16 == 0 and g in {32, 64, 128, 256}.
- "int8x8" (W8A8, scheme "w8a8"): the activations are quantized too, per token, dynamically (the
  vector-wise scheme of LLM.int8, Dettmers et al. 2022, without its outlier split; SmoothQuant's
  per-token dynamic W8A8, Xiao et al. 2023, without the smoothing):
      a_t = max_i |x_ti| / 127,  X8 = round(x / a_t) in [-127, 127],
      y = (X8 W8^T) * a_t * s    with X8 W8^T exact in int32 (`torch._int_mm`).
- "tiled": everything else (int3, odd shapes, groupwise int8, NF4): dequantize a tile of output rows
  (at most TILE_BYTES of fp32), multiply, move on, so memory stays bounded by one tile.

The fast kernels compute in fp32; inputs of other dtypes are cast and the result cast back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from .errors import CompressError
from .intq import IntQuantized, PackedInt
from .nf4 import NF4Tensor

TILE_BYTES = 4 << 20
INT4_GROUPS = (32, 64, 128, 256)

Quantized = Union[IntQuantized, PackedInt, NF4Tensor]


@dataclass
class Int8Plan:
    weight: Tensor            # (out, in) int8, q - 128
    scale: Tensor             # (out,) float32
    shift: Tensor | None      # (out,) float32 (128 - z) * s, asymmetric grids only
    act_bits: int | None = None   # 8: W8A8 (symmetric weights), the activations quantized per token

    @property
    def name(self) -> str:
        return "int8x8" if self.act_bits else "int8pack"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class Int4Plan:
    packed: Tensor            # torch's opaque int4 CPU layout of the (out, in) codes
    scales_and_zeros: Tensor  # (in / g, out, 2) float32
    group_size: int
    out_features: int
    name: str = "int4pack"


@dataclass
class TiledPlan:
    rows: Callable[[int, int], Tensor]   # (r0, r1) -> (r1 - r0, in) float32
    shape: tuple[int, int]
    name: str = "tiled"

    @property
    def out_features(self) -> int:
        return self.shape[0]


Plan = Union[Int8Plan, Int4Plan, TiledPlan]
PLANS = (Int8Plan, Int4Plan, TiledPlan)


def int8_supported(w: PackedInt) -> bool:
    return w.bits == 8 and w.group_size == w.shape[1]


def int4_supported(w: PackedInt) -> bool:
    return w.bits == 4 and w.shape[0] % 16 == 0 and w.group_size in INT4_GROUPS


def choose_kernel(w: Quantized, fast: bool = True) -> str:
    """The kernel `prepare` picks for this weight: "int8pack", "int4pack" or "tiled"."""
    if isinstance(w, NF4Tensor) or not fast:
        return "tiled"
    if int8_supported(w):
        return "int8pack"
    return "int4pack" if int4_supported(w) else "tiled"


def prepare(w: Quantized, fast: bool = True, act_bits: int | None = None) -> Plan:
    """The kernel plan of a quantized weight; `fast=False` forces the tiled fallback;
    `act_bits=8` quantizes the activations too (W8A8: 8-bit symmetric per-channel weights only)."""
    kernel = choose_kernel(w, fast)
    if isinstance(w, IntQuantized):
        w = w.pack()
    if act_bits is not None:
        if act_bits != 8 or isinstance(w, NF4Tensor) or not int8_supported(w) or not w.symmetric:
            raise CompressError(f"prepare: act_bits={act_bits}: expected 8, with an 8-bit symmetric "
                                f"per-channel weight (found {type(w).__name__} {getattr(w, 'bits', 4)} bits)")
        return Int8Plan(weight=w.data.reshape(w.shape), scale=w.scale.reshape(-1).float(), shift=None,
                        act_bits=8)
    if isinstance(w, NF4Tensor):
        return TiledPlan(rows=nf4_rows(w), shape=tuple(w.shape))
    if kernel == "int8pack":
        scale = w.scale.reshape(-1).float()                                         # (out,)
        shift = None if w.zero is None else (128 - w.zero.reshape(-1).float()) * scale
        return Int8Plan(weight=w.data.reshape(w.shape), scale=scale, shift=shift)
    if kernel == "int4pack":
        codes = w.codes_rows(0, w.shape[0]).to(torch.int32)                         # (out, in)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        s = w.scale.float()                                                         # (out, groups)
        z = (8 - w.zero_points()) * s
        sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()                       # (groups, out, 2)
        return Int4Plan(packed=packed, scales_and_zeros=sz, group_size=w.group_size,
                        out_features=w.shape[0])
    return TiledPlan(rows=w.dequantize_rows, shape=tuple(w.shape))


def nf4_rows(w: NF4Tensor) -> Callable[[int, int], Tensor]:
    out, n_in = w.shape
    absmax = w.block_absmax()                   # once per plan, not per tile

    def rows(r0: int, r1: int) -> Tensor:
        return w.dequantize_flat(r0 * n_in, r1 * n_in, absmax).reshape(r1 - r0, n_in)
    return rows


def tile_rows(n_in: int) -> int:
    """Output rows per tile: TILE_BYTES of fp32, a multiple of 8 (packed rows start on a byte)."""
    return max(8, (TILE_BYTES // (4 * n_in)) // 8 * 8)


def tiled_matmul(x: Tensor, plan: TiledPlan) -> Tensor:
    """x (M, in) float32 -> (M, out), one dequantized tile of rows at a time."""
    out, n_in = plan.shape
    y = x.new_empty(x.shape[0], out)
    step = tile_rows(n_in)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        torch.matmul(x, plan.rows(r0, r1).t(), out=y[:, r0:r1])                    # (M, r1 - r0)
    return y


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, in) -> (int8 codes (M, in), per-token scale (M, 1)), symmetric absmax / 127."""
    a = x.abs().amax(dim=1, keepdim=True) / 127                                     # (M, 1)
    a = torch.where(a == 0, torch.ones_like(a), a)
    return torch.round(x / a).clamp_(-127, 127).to(torch.int8), a


def w8a8_matmul(x: Tensor, plan: Int8Plan) -> Tensor:
    """x (M, in) float32 -> (M, out): int8 x int8 -> int32, then both scales."""
    xq, a = quantize_tokens(x)
    acc = torch._int_mm(xq, plan.weight.t())                                        # (M, out) int32
    return acc.float() * a * plan.scale


def run_plan(x: Tensor, plan: Plan) -> Tensor:
    """x (M, in) float32 contiguous -> (M, out) float32."""
    if isinstance(plan, Int8Plan) and plan.act_bits:
        return w8a8_matmul(x, plan)
    if isinstance(plan, Int8Plan):
        y = torch.ops.aten._weight_int8pack_mm(x, plan.weight, plan.scale)
        if plan.shift is not None:
            y = y + x.sum(dim=1, keepdim=True) * plan.shift
        return y
    if isinstance(plan, Int4Plan):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, plan.packed, plan.group_size,
                                                          plan.scales_and_zeros)
    return tiled_matmul(x, plan)


def matmul(x: Tensor, w: Quantized | Plan) -> Tensor:
    """x (..., in) @ W'^T -> (..., out), in x's dtype. `w` is a quantized weight or its plan."""
    plan = w if isinstance(w, PLANS) else prepare(w)
    out = plan.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()                           # (M, in)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, out)
    return run_plan(x2, plan).reshape(*lead, out).to(x.dtype)


def kernel_name(w: Quantized | Plan) -> str:
    """Which kernel `matmul` uses for this weight or plan: "int8pack", "int4pack", "int8x8" or "tiled"."""
    return w.name if isinstance(w, PLANS) else choose_kernel(w)
