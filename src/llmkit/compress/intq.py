"""Integer weight quantization on a uniform grid: int8 per output channel, int4 / int3 groupwise.

Round-to-nearest (RTN) on a per-group affine grid (Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference"; groupwise as in GPTQ, Frantar et
al. 2023, and AWQ, Lin et al. 2024). A group is `group_size` consecutive input columns of one
output row; `group_size=None` is one group per row (per output channel, the int8 case).

    code  q = clamp(round(w / s) + z, 0, 2^b - 1)       (unsigned b-bit code)
    value w' = (q - z) * s

    symmetric:  z = 2^(b-1),  s = max|w| / (2^(b-1) - 1)       (signed value q - z in [-(2^(b-1)-1), 2^(b-1)-1])
    asymmetric: s = (max(w, 0) - min(w, 0)) / (2^b - 1),  z = round(-min(w, 0) / s)
                (the range always holds 0, so an exact zero weight stays exactly zero)

An all-zero group would give s = 0; it gets s = 1 (every code is then z, every value 0).

Storage (`PackedInt`, what `nbytes` counts): codes packed b bits each (`pack_bits`; 8-bit codes
as the int8 value q - 128, which the int8 kernel reads in place), one fp32 scale per group,
and for the asymmetric grid one uint8 zero point per group (a symmetric grid's zero point is the
constant 2^(b-1), so it is not stored). So int8 per channel costs 8 + 32/in bits per weight,
int4 g128 symmetric 4.25, asymmetric 4.3125.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CompressError

INT_BITS = range(2, 9)


def grid_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The per-row grid of `w` (rows, cols): scale (rows, 1) float32 and zero (rows, 1) float32."""
    w = w.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1, keepdim=True) / qmax                          # (rows, 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)                                 # (rows, 1)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """uint8 codes clamp(round(w / scale) + zero, 0, 2^bits - 1); scale / zero broadcast against w."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp_(0, 2 ** bits - 1).to(torch.uint8)


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """(q - zero) * scale in float32; scale / zero broadcast against q."""
    return (q.float() - zero) * scale


def dequantize_groups(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """codes (rows, in) with one (scale, zero) per group of in // groups columns -> float32 (rows, in)."""
    rows, n_in = codes.shape
    q = codes.reshape(rows, scale.shape[1], -1)                                    # (rows, groups, g)
    return dequantize_codes(q, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(rows, n_in)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (any shape, each < 2^bits) into a flat uint8 tensor, `bits` bits per code.

    The codes are read in row-major order as one big-endian bit stream: the first code sits in the
    high bits of the first byte (for 4 bits: first code in the high nibble, as bitsandbytes packs
    NF4). The stream is zero-padded to whole bytes.
    """
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8).clone()
    n = flat.numel()
    pad = (-n) % 8
    # 8 codes of b bits are exactly b bytes: build each 8-code chunk as one 8b-bit integer (<= 56 bits).
    chunk = torch.cat([flat, flat.new_zeros(pad)]).to(torch.int64).reshape(-1, 8)   # (n/8, 8)
    shifts = torch.arange(7, -1, -1, dtype=torch.int64) * bits                      # (8,)
    word = (chunk << shifts).sum(dim=1, keepdim=True)                               # (n/8, 1)
    byte_shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64) * 8             # (bits,)
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)                # (n/8 * bits,)
    return out[: math.ceil(n * bits / 8)]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_bits`: the first `numel` codes, flat uint8."""
    if bits == 8:
        return packed[:numel].clone()
    nbytes = math.ceil(numel * bits / 8)
    padded = math.ceil(numel / 8) * bits
    raw = torch.cat([packed[:nbytes], packed.new_zeros(padded - nbytes)]).to(torch.int64)
    raw = raw.reshape(-1, bits)                                                     # (n/8, bits)
    byte_shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64) * 8
    word = (raw << byte_shifts).sum(dim=1, keepdim=True)                            # (n/8, 1)
    shifts = torch.arange(7, -1, -1, dtype=torch.int64) * bits
    codes = (word >> shifts) & (2 ** bits - 1)                                      # (n/8, 8)
    return codes.reshape(-1)[:numel].to(torch.uint8)


@dataclass
class IntQuantized:
    """A weight (out, in) on a per-group integer grid; codes kept unpacked for the kernels."""

    codes: Tensor        # (out, in) uint8
    scale: Tensor        # (out, in // group_size) float32
    zero: Tensor         # (out, in // group_size) float32 (integers in [0, 2^bits - 1])
    bits: int
    group_size: int      # == in for per output channel
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> Tensor:
        """The float32 weight (out, in) the codes stand for."""
        return dequantize_groups(self.codes, self.scale, self.zero)

    def nbytes(self) -> int:
        """Bytes as stored: packed codes, fp32 scales, uint8 zero points when asymmetric."""
        codes = math.ceil(self.codes.numel() * self.bits / 8)
        zeros = 0 if self.symmetric else self.zero.numel()
        return codes + 4 * self.scale.numel() + zeros

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.codes.numel()

    def pack(self) -> PackedInt:
        if self.bits == 8:   # q - 128 as int8: the int8 kernel's weight, no copy at matmul time
            data = (self.codes.to(torch.int16) - 128).to(torch.int8).reshape(-1)
        else:
            data = pack_bits(self.codes, self.bits)
        zero = None if self.symmetric else self.zero.to(torch.uint8)
        return PackedInt(data=data, scale=self.scale.float().contiguous(), zero=zero, bits=self.bits,
                         group_size=self.group_size, shape=self.shape)


@dataclass
class PackedInt:
    """The stored form of an IntQuantized: a flat code stream, fp32 scales, uint8 zeros if asymmetric."""

    data: Tensor               # (ceil(out * in * bits / 8),) uint8, or (out * in,) int8 for 8 bits
    scale: Tensor              # (out, in // group_size) float32
    zero: Tensor | None        # (out, in // group_size) uint8; None: symmetric, zero = 2^(bits-1)
    bits: int
    group_size: int
    shape: tuple[int, int]

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def zero_points(self) -> Tensor:
        """(out, groups) float32 zero points."""
        if self.zero is None:
            return torch.full_like(self.scale, float(2 ** (self.bits - 1)))
        return self.zero.float()

    def codes_rows(self, r0: int, r1: int) -> Tensor:
        """uint8 codes of output rows [r0, r1), (r1 - r0, in). r0 * in must be a multiple of 8
        (8 codes of b bits fill exactly b bytes), e.g. r0 a multiple of 8."""
        n_in = self.shape[1]
        if self.bits == 8:
            rows = self.data[r0 * n_in: r1 * n_in].to(torch.int16) + 128
            return rows.to(torch.uint8).reshape(r1 - r0, n_in)
        if (r0 * n_in) % 8:
            raise ValueError(f"codes_rows: r0={r0}: r0 * in must be a multiple of 8")
        start = r0 * n_in * self.bits // 8
        stop = math.ceil(r1 * n_in * self.bits / 8)
        return unpack_bits(self.data[start:stop], self.bits, (r1 - r0) * n_in).reshape(r1 - r0, n_in)

    def dequantize_rows(self, r0: int, r1: int) -> Tensor:
        """float32 weight rows [r0, r1), (r1 - r0, in)."""
        return dequantize_groups(self.codes_rows(r0, r1), self.scale[r0:r1], self.zero_points()[r0:r1])

    def unpack(self) -> IntQuantized:
        return IntQuantized(codes=self.codes_rows(0, self.shape[0]), scale=self.scale,
                            zero=self.zero_points(), bits=self.bits, group_size=self.group_size,
                            symmetric=self.symmetric)

    def nbytes(self) -> int:
        zeros = 0 if self.zero is None else self.zero.numel()
        return self.data.numel() * self.data.element_size() + 4 * self.scale.numel() + zeros


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in INT_BITS:
        raise CompressError(f"quantize_int: bits={bits!r}: expected an integer in 2..8")


def check_group_size(group_size: int | None, n_in: int, where: str = "the weight") -> int:
    """The effective group size (n_in for None); a CompressError unless it divides n_in."""
    if group_size is None:
        return n_in
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise CompressError(f"group_size={group_size!r}: expected a positive integer or None "
                            f"(one group per output channel)")
    if n_in % group_size:
        raise CompressError(f"group_size={group_size} does not divide the input dimension {n_in} "
                            f"of {where}: expected a divisor of {n_in}")
    return group_size


def quantize_int(w: Tensor, bits: int = 4, group_size: int | None = 128,
                 symmetric: bool = True) -> IntQuantized:
    """RTN-quantize w (out, in) to `bits`-bit codes, one grid per `group_size` input columns."""
    check_bits(bits)
    if w.dim() != 2:
        raise CompressError(f"quantize_int: w.shape={tuple(w.shape)}: expected a 2-D weight (out, in)")
    out, n_in = w.shape
    g = check_group_size(group_size, n_in, f"a weight of shape {tuple(w.shape)}")
    groups = w.detach().float().reshape(out * (n_in // g), g)                      # (out*groups, g)
    scale, zero = grid_params(groups, bits, symmetric)                             # (out*groups, 1)
    codes = quantize_codes(groups, scale, zero, bits).reshape(out, n_in)
    return IntQuantized(codes=codes, scale=scale.reshape(out, n_in // g),
                        zero=zero.reshape(out, n_in // g), bits=bits, group_size=g,
                        symmetric=symmetric)
