"""compress.nf4: the NF4 table (published values, its quantile definition, bitsandbytes' table),
dequantize equal to bitsandbytes' dequantize_4bit with and without double quantization, packing,
on-grid round trips, bits per weight from the stored bytes, bad input."""
from __future__ import annotations

import warnings

import pytest
import torch

from llmkit.compress import NF4_CODE, CompressError, quantize_nf4
from llmkit.compress.nf4 import dynamic_map

# The NF4 values as QLoRA (Dettmers et al. 2023, appendix E) and bitsandbytes publish them.
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]

SHAPES = [(64, 128), (33, 70), (300, 256)]     # whole blocks; a short last block; > 256 blocks


def bnb():
    """bitsandbytes.functional, an optional peer: the tests that compare against it skip without it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.functional")


def test_table_is_the_published_one():
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, torch.tensor(PUBLISHED, dtype=torch.float32))


def test_table_is_the_normal_quantile_construction():
    """QLoRA eq. 4: equal-mass quantiles of N(0, 1) with offset 0.9677083, 8 on the positive side
    and 7 on the negative side, an exact zero, scaled to [-1, 1]."""
    offset = 0.9677083

    def ppf(n):
        return torch.special.ndtri(torch.linspace(offset, 0.5, n)[:-1].double()).float()
    values = torch.cat([ppf(9), torch.zeros(1), -ppf(8)]).sort().values
    assert torch.equal(values / values.max(), NF4_CODE)


def test_tables_equal_bitsandbytes():
    F = bnb()
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_bitsandbytes(shape, double_quant):
    F = bnb()
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(w, block_size=64, double_quant=double_quant)
    assert torch.equal(ours.data, packed.reshape(-1))                       # same codes, same nibble order
    assert torch.equal(ours.dequantize(), F.dequantize_4bit(packed, state))


def test_two_codes_per_byte_first_in_the_high_nibble():
    w = torch.tensor([1.0, -1.0, 0.0, 0.5] + [0.0] * 60)                    # one block, absmax 1
    q = quantize_nf4(w)
    hi, lo = q.data[0] >> 4, q.data[0] & 0xF
    assert (NF4_CODE[hi.long()], NF4_CODE[lo.long()]) == (1.0, -1.0)
    assert q.data.numel() == 32


@pytest.mark.parametrize("numel", [64 * 8, 64 * 5 + 30])
def test_on_grid_values_round_trip_exactly(numel):
    gen = torch.Generator().manual_seed(numel)
    blocks = -(-numel // 64)
    codes = torch.randint(0, 16, (blocks * 64,), generator=gen)
    codes[::64] = 15                                                         # each block reaches +1: absmax kept
    absmax = torch.rand(blocks, generator=gen) + 0.1
    w = (NF4_CODE[codes].reshape(blocks, 64) * absmax[:, None]).reshape(-1)[:numel]
    q = quantize_nf4(w)
    assert torch.equal(q.absmax, absmax)
    assert torch.equal(q.dequantize(), w)


def test_double_quant_absmax_error_is_small():
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(7))
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    rel = (dq.block_absmax() - plain.absmax).abs() / plain.absmax
    assert rel.max() < 0.02                              # 8-bit dynamic codes near the mean-subtracted values
    err_plain = (plain.dequantize() - w).norm()
    assert (dq.dequantize() - w).norm() < 1.05 * err_plain


def test_dequantize_flat_matches_the_full_tensor():
    w = torch.randn(10, 70, generator=torch.Generator().manual_seed(8))
    for dq in (False, True):
        q = quantize_nf4(w, double_quant=dq)
        full = q.dequantize().reshape(-1)
        for start, stop in [(0, 700), (64, 192), (7, 301), (640, 700)]:
            assert torch.equal(q.dequantize_flat(start, stop), full[start:stop])


def test_bits_per_weight_from_stored_bytes():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(9))   # 1024 blocks = 4 blocks of 256
    plain = quantize_nf4(w)
    stored = plain.data.numel() + 4 * plain.absmax.numel()
    assert plain.nbytes() == stored and 8 * stored / w.numel() == plain.bits_per_weight == 4.5
    dq = quantize_nf4(w, double_quant=True)
    stored = dq.data.numel() + dq.qabsmax.numel() * dq.qabsmax.element_size() \
        + 4 * dq.absmax2.numel() + 4 * dq.offset.numel()
    assert dq.qabsmax.dtype == torch.uint8 and dq.nbytes() == stored
    fmt = 4 + 8 / 64 + 32 / (64 * 256)
    assert dq.bits_per_weight == pytest.approx(fmt + 32 / w.numel(), abs=1e-12)   # + the one fp32 mean
    assert dq.bits_per_weight == pytest.approx(4.127, abs=1e-3)


def test_dequantize_keeps_the_input_dtype():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    assert quantize_nf4(w).dequantize().dtype == torch.bfloat16
    assert quantize_nf4(w).dequantize(torch.float32).dtype == torch.float32


def test_bad_block_size_and_dtype():
    with pytest.raises(CompressError, match="block_size=48: expected one of 32, 64"):
        quantize_nf4(torch.zeros(4, 64), block_size=48)
    with pytest.raises(CompressError, match="w.dtype=torch.int64: expected a floating-point"):
        quantize_nf4(torch.zeros(4, 64, dtype=torch.long))
