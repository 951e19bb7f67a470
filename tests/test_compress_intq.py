"""compress.intq: the integer grids (formulas), exact round trips of on-grid weights, the RTN error
bound, bit packing, bits per weight from the stored bytes, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from llmkit.compress import CompressError, quantize_int
from llmkit.compress.intq import (dequantize_codes, grid_params, pack_bits, quantize_codes,
                                  unpack_bits)

# (bits, group_size, symmetric): int8 per channel, int4 / int3 / int2 groupwise
GRIDS = [(8, None, True), (8, None, False), (4, 32, True), (4, 32, False), (3, 16, True), (3, 16, False),
         (2, 16, False)]


def test_grid_params_follow_the_formulas():
    w = torch.tensor([[-3.0, 1.0, 0.5], [0.25, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -4.0, -2.0]])
    scale, zero = grid_params(w, 4, symmetric=True)
    assert torch.equal(scale[:, 0], torch.tensor([3 / 7, 2 / 7, 1.0, 4 / 7]))     # absmax / 7; zero row -> 1
    assert torch.equal(zero, torch.full((4, 1), 8.0))
    scale, zero = grid_params(w, 4, symmetric=False)
    lo = torch.tensor([-3.0, 0.0, 0.0, -4.0])                                        # min(w, 0)
    hi = torch.tensor([1.0, 2.0, 0.0, 0.0])                                          # max(w, 0)
    want = (hi - lo) / 15
    want[2] = 1.0
    assert torch.equal(scale[:, 0], want)
    assert torch.equal(zero[:, 0], torch.round(-lo / want))
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == (4, 1)


def on_grid(bits: int, group: int | None, symmetric: bool, out: int = 8, n_in: int = 64, seed: int = 0):
    """A weight exactly on its own grid: w = (q - z) s with s a power of two per group and each group
    reaching the grid's ends, so grid_params recovers s and z exactly."""
    gen = torch.Generator().manual_seed(seed)
    g = group or n_in
    groups = n_in // g
    s = 2.0 ** -torch.randint(2, 9, (out, groups, 1), generator=gen).float()
    if symmetric:
        z = torch.full((out, groups, 1), 2.0 ** (bits - 1))
        q = torch.randint(1, 2 ** bits, (out, groups, g), generator=gen).float()
        q[..., 0] = 2 ** bits - 1                                                  # q - z = +qmax
    else:
        z = torch.randint(0, 2 ** bits, (out, groups, 1), generator=gen).float()
        q = torch.randint(0, 2 ** bits, (out, groups, g), generator=gen).float()
        q[..., 0], q[..., 1] = 0, 2 ** bits - 1                                     # both ends
    return ((q - z) * s).reshape(out, n_in), q.reshape(out, n_in).to(torch.uint8)


@pytest.mark.parametrize("bits,group,symmetric", GRIDS)
def test_on_grid_weights_round_trip_exactly(bits, group, symmetric):
    w, codes = on_grid(bits, group, symmetric)
    q = quantize_int(w, bits, group, symmetric)
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.dequantize(), w)
    assert torch.equal(q.pack().unpack().dequantize(), w)


@pytest.mark.parametrize("bits,group,symmetric", GRIDS)
def test_rtn_error_is_at_most_half_a_step(bits, group, symmetric):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_int(w, bits, group, symmetric)
    step = q.scale.repeat_interleave(q.group_size, dim=1)                          # (out, in)
    assert ((q.dequantize() - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2 ** bits


def test_int8_per_channel_is_signed_absmax():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    q = quantize_int(w, 8, None, True)
    signed = q.codes.to(torch.int16) - 128
    assert signed.abs().max() == 127 and q.group_size == 40 and q.scale.shape == (6, 1)
    assert torch.equal(q.scale[:, 0], w.abs().amax(1) / 127)
    assert torch.equal(q.pack().data.reshape(6, 40), signed.to(torch.int8))        # stored as q - 128


def test_codes_helpers_agree_with_their_formulas():
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(3))
    scale, zero = grid_params(w, 3, symmetric=False)
    q = quantize_codes(w, scale, zero, 3)
    assert torch.equal(q, torch.clamp(torch.round(w / scale) + zero, 0, 7).to(torch.uint8))
    assert torch.equal(dequantize_codes(q, scale, zero), (q.float() - zero) * scale)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_bits_round_trip_and_size(bits):
    codes = torch.randint(0, 2 ** bits, (7, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).reshape(7, 13), codes)


def test_pack_bits_is_big_endian():
    codes = torch.tensor([0x1, 0x2, 0xF, 0x3], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [(1 << 4) | 2, (0xF << 4) | 3]          # first in the high nibble
    assert pack_bits(torch.tensor([5, 0, 0, 0, 0, 0, 0, 7], dtype=torch.uint8), 3).tolist() == \
        [5 << 5, 0, 7]                                                              # 101 000 ... 111


@pytest.mark.parametrize("bits,group,symmetric", GRIDS)
def test_packed_rows_equal_the_full_dequantization(bits, group, symmetric):
    w = torch.randn(24, 48 if group != 32 else 64, generator=torch.Generator().manual_seed(4))
    q = quantize_int(w, bits, group, symmetric)
    packed = q.pack()
    assert torch.equal(packed.dequantize_rows(8, 24), q.dequantize()[8:24])
    back = packed.unpack()
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero)


@pytest.mark.parametrize("bits,group,symmetric,n_in", [(8, None, True, 64), (4, 128, True, 256),
                                                         (4, 128, False, 256), (3, 64, True, 128),
                                                         (4, 32, True, 64)])
def test_bits_per_weight_from_stored_bytes(bits, group, symmetric, n_in):
    w = torch.randn(32, n_in, generator=torch.Generator().manual_seed(5))
    q = quantize_int(w, bits, group, symmetric)
    packed = q.pack()
    stored = [packed.data, packed.scale] + ([] if packed.zero is None else [packed.zero])
    nbytes = sum(t.numel() * t.element_size() for t in stored)
    g = group or n_in
    fmt = bits + 32 / g + (0 if symmetric else 8 / g)           # codes + fp32 scale (+ uint8 zero) per group
    assert nbytes == q.nbytes() == packed.nbytes()
    assert 8 * nbytes / w.numel() == q.bits_per_weight == fmt


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(CompressError, match="group_size=48 does not divide the input dimension 64"):
        quantize_int(torch.zeros(4, 64), 4, 48)
    with pytest.raises(CompressError, match="group_size=0"):
        quantize_int(torch.zeros(4, 64), 4, 0)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(CompressError, match=r"bits=.*expected an integer in 2\.\.8"):
        quantize_int(torch.zeros(4, 64), bits, 32)


def test_a_weight_must_be_2d():
    with pytest.raises(CompressError, match=r"w.shape=\(64,\).*2-D"):
        quantize_int(torch.zeros(64), 4, 32)

