"""NF4, the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", section 3), in the layout bitsandbytes stores it, so the two dequantize alike.

    blocks:      the tensor, flattened row-major, in blocks of B = 64 values (the last may be short)
    absmax:      a_j = max_{i in block j} |w_i|                                  (fp32, one per block)
    code:        q_i = the index of the NF4 value nearest to w_i / a_j (ties go to the lower value)
    dequantize:  w'_i = NF4[q_i] * a_j
    packing:     two codes per byte, the first element in the high nibble

NF4[0..15] are quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (the paper's eq. 4, with
one side given 8 values and the other 7, "create_normal_map(offset=0.9677083)" in bitsandbytes); the
table below is bitsandbytes' float32 table, value for value.

Double quantization (the paper's section 3, "Double Quantization"): the absmax values a_j, minus
their mean c, are quantized in blocks of 256 to 8-bit codes of the signed dynamic map
(Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning"), with an fp32 absmax per
256-block:  a'_j = DYN[r_j] * b_k + c  (r_j chosen as in `dynamic_code_index`).  Bits per weight: 4 + 32/64 = 4.5 without it,
4 + 8/64 + 32/(64 * 256) ~ 4.127 with it (plus the one fp32 mean c per tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from .errors import CompressError
from .intq import pack_bits, unpack_bits

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

DQ_BLOCK = 256          # the block of the second quantization, as in QLoRA / bitsandbytes
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@lru_cache(maxsize=1)
def dynamic_map() -> Tensor:
    """The signed 8-bit dynamic map (Dettmers 2016): 256 sorted values in [-1, 1].

    One sign bit; exponent e in 0..6 takes the decades 10^(e-6); each decade holds 2^e linear
    fractions (midpoints of linspace(0.1, 1, 2^e + 1)), for both signs; plus 0 and 1.
    """
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0                                      # (2^e,)
        decade = 10 ** (e - 6)
        values += [decade * mids, -decade * mids]
    return torch.sort(torch.cat(values).float()).values                             # (256,)


def nearest_code(x: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest value of the sorted `code` for each x; a tie goes to the lower one."""
    midpoints = (code[:-1] + code[1:]) / 2                                          # (len - 1,)
    return torch.bucketize(x, midpoints).to(torch.uint8)


LUT_LEVELS = 65536


@lru_cache(maxsize=1)
def dynamic_lut() -> Tensor:
    """For each of 65536 evenly spaced levels v_i = -1 + 2i / 65535: the index of its nearest
    dynamic-map value (the number of midpoints strictly below v_i)."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])                                        # (255,)
    levels = -1.0 + (2.0 * torch.arange(LUT_LEVELS, dtype=torch.float32)) / (LUT_LEVELS - 1)
    return torch.searchsorted(midpoints, levels).to(torch.uint8)                    # (65536,)


def dynamic_code_index(x: Tensor) -> Tensor:
    """8-bit dynamic-map codes for x in [-1, 1], picked as bitsandbytes' CPU kernel picks them
    (its quantize_blockwise since 0.50): x is first rounded to the nearest of 65536 levels, then
    the level's nearest code is taken. It differs from the exact nearest code only for x within
    1.5e-5 of a midpoint, far below the code spacing; following it keeps dequantize equal to
    bitsandbytes' on this backend."""
    level = ((x.clamp(-1, 1) + 1.0) * 0.5 * (LUT_LEVELS - 1) + 0.5).to(torch.int64)  # floor, x >= -1
    return dynamic_lut()[level]


def blockwise_absmax(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """flat (n,) -> (absmax (ceil(n/block),), flat / absmax clamped to [-1, 1] (n,))."""
    n = flat.numel()
    padded = torch.cat([flat, flat.new_zeros((-n) % block)]).reshape(-1, block)    # (blocks, block)
    absmax = padded.abs().amax(dim=1)                                               # (blocks,)
    # Multiply by the reciprocal (as bitsandbytes does) so codes agree at the last bit; an all-zero
    # block keeps absmax 0 and every value scales to 0.
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    return absmax, scaled.clamp(-1, 1).reshape(-1)[:n]


@dataclass
class NF4Tensor:
    """A packed NF4 tensor: `data` holds two codes per byte; statistics plain or double-quantized."""

    data: Tensor                      # (ceil(n / 2),) uint8
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int = 64
    absmax: Tensor | None = None      # (blocks,) float32, without double quantization
    qabsmax: Tensor | None = None     # (blocks,) uint8 codes of DYN, with double quantization
    absmax2: Tensor | None = None     # (ceil(blocks / 256),) float32
    offset: Tensor | None = None      # () float32, the mean subtracted from the absmax values
    code2: Tensor = field(default_factory=dynamic_map)

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> Tensor:
        """The fp32 absmax of every block (blocks,), rebuilt from the second quantization if any."""
        if not self.double_quant:
            return self.absmax
        blocks = self.qabsmax.numel()
        r = self.code2[self.qabsmax.long()]                                         # (blocks,)
        r = torch.cat([r, r.new_zeros((-blocks) % DQ_BLOCK)]).reshape(-1, DQ_BLOCK)
        a = (r * self.absmax2.unsqueeze(1)).reshape(-1)[:blocks]
        return a + self.offset

    def dequantize_flat(self, start: int = 0, stop: int | None = None,
                        absmax: Tensor | None = None) -> Tensor:
        """Elements [start, stop) of the flattened tensor, float32 (a tile for the kernels);
        `absmax` is `block_absmax()` when the caller already has it."""
        stop = self.numel if stop is None else stop
        absmax = self.block_absmax() if absmax is None else absmax
        first = start - start % 2                                                   # whole bytes
        codes = unpack_bits(self.data[first // 2: (stop + 1) // 2], 4, stop - first)
        values = NF4_CODE[codes.long()][start - first:]                             # (stop - start,)
        b = self.block_size
        if start % b == 0 and (stop - start) % b == 0:   # whole blocks: one broadcast multiply
            scaled = values.reshape(-1, b) * absmax[start // b: stop // b].unsqueeze(1)
            return scaled.reshape(-1)
        return values * absmax[torch.arange(start, stop) // b]

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor back, in `dtype` (default: the dtype it was quantized from)."""
        return self.dequantize_flat().reshape(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes as stored: packed codes + fp32 absmax, or uint8 absmax codes + fp32 second absmax
        + the fp32 offset (the dynamic map is a constant of the format, not stored)."""
        if not self.double_quant:
            return self.data.numel() + 4 * self.absmax.numel()
        return self.data.numel() + self.qabsmax.numel() + 4 * self.absmax2.numel() + 4

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.numel


def quantize_nf4(w: Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize w (any shape) to NF4 in blocks of `block_size`, optionally double-quantized."""
    if block_size not in NF4_BLOCK_SIZES:
        raise CompressError(f"quantize_nf4: block_size={block_size!r}: expected one of "
                            f"{', '.join(map(str, NF4_BLOCK_SIZES))}")
    if not w.is_floating_point():
        raise CompressError(f"quantize_nf4: w.dtype={w.dtype}: expected a floating-point tensor")
    flat = w.detach().reshape(-1).float()                                           # (n,)
    absmax, scaled = blockwise_absmax(flat, block_size)
    data = pack_bits(nearest_code(scaled, NF4_CODE), 4)                             # (ceil(n/2),)
    out = NF4Tensor(data=data, shape=tuple(w.shape), dtype=w.dtype, block_size=block_size)
    if not double_quant:
        out.absmax = absmax
        return out
    offset = absmax.mean()
    absmax2, scaled2 = blockwise_absmax(absmax - offset, DQ_BLOCK)
    out.qabsmax = dynamic_code_index(scaled2)
    out.absmax2, out.offset = absmax2, offset
    return out
