"""compress.kernels: torch's int4 CPU op convention, and every kernel (int8pack, int4pack, tiled)
equal to dequantize-then-matmul, over shapes, dtypes and tile boundaries."""
from __future__ import annotations

import pytest
import torch

from llmkit.compress import CompressError, kernels, quantize_int, quantize_nf4
from llmkit.compress.kernels import kernel_name, matmul, prepare

# (label, quantizer, shape (out, in), kernel the dispatcher must pick)
CASES = [
    ("int8 sym", lambda w: quantize_int(w, 8, None, True), (48, 128), "int8pack"),
    ("int8 asym", lambda w: quantize_int(w, 8, None, False), (48, 128), "int8pack"),
    ("int4 g32 sym", lambda w: quantize_int(w, 4, 32, True), (48, 128), "int4pack"),
    ("int4 g64 asym", lambda w: quantize_int(w, 4, 64, False), (32, 128), "int4pack"),
    ("int4 g128 per channel", lambda w: quantize_int(w, 4, None, True), (16, 128), "int4pack"),
    ("int4 out % 16 != 0", lambda w: quantize_int(w, 4, 32, True), (40, 64), "tiled"),
    ("int4 g16", lambda w: quantize_int(w, 4, 16, False), (32, 64), "tiled"),
    ("int8 groupwise", lambda w: quantize_int(w, 8, 32, True), (24, 64), "tiled"),
    ("int3 g32", lambda w: quantize_int(w, 3, 32, True), (48, 128), "tiled"),
    ("int3 in % 8 != 0", lambda w: quantize_int(w, 3, 12, False), (21, 36), "tiled"),
    ("nf4", lambda w: quantize_nf4(w), (48, 128), "tiled"),
    ("nf4 double quant", lambda w: quantize_nf4(w, double_quant=True), (20, 70), "tiled"),
]


def cases(*labels):
    chosen = [c for c in CASES if c[0] in labels] if labels else CASES
    return pytest.mark.parametrize("label,make,shape,kernel", chosen, ids=[c[0] for c in chosen])


def weight(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def assert_matches_reference(y, x, w_dq):
    ref = x.float() @ w_dq.t()
    assert y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_int4_op_computes_q_minus_8_times_scale_plus_zero():
    """The convention kernels.py maps our grids onto: w = (q - 8) * S + Z per group."""
    gen = torch.Generator().manual_seed(0)
    out, n_in, g = 32, 128, 32
    q = torch.randint(0, 16, (out, n_in), dtype=torch.int32, generator=gen)
    s = torch.rand(n_in // g, out, generator=gen) + 0.5
    z = torch.randn(n_in // g, out, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x = torch.randn(5, n_in, generator=gen)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, torch.stack([s, z], -1))
    w = (q.float() - 8) * s.t().repeat_interleave(g, 1) + z.t().repeat_interleave(g, 1)
    assert_matches_reference(y, x, w)


@cases()
def test_kernel_equals_dequantize_then_matmul(label, make, shape, kernel):
    q = make(weight(shape))
    plan = prepare(q)
    assert kernel_name(plan) == kernel_name(q) == kernel
    x = torch.randn(3, 7, shape[1], generator=torch.Generator().manual_seed(1))     # (..., in)
    assert_matches_reference(matmul(x, plan), x, q.dequantize().float())


@cases("int8 sym", "int8 asym", "int4 g32 sym", "int4 g64 asym")
def test_fast_kernel_equals_the_tiled_fallback(label, make, shape, kernel):
    q = make(weight(shape, seed=2))
    x = torch.randn(4, shape[1], generator=torch.Generator().manual_seed(3))
    slow = prepare(q, fast=False)
    assert kernel_name(slow) == "tiled"
    torch.testing.assert_close(matmul(x, prepare(q)), matmul(x, slow), rtol=1e-5, atol=1e-5)


@cases("int3 g32", "int3 in % 8 != 0", "nf4 double quant")
def test_tiled_fallback_across_many_tiles(monkeypatch, label, make, shape, kernel):
    monkeypatch.setattr(kernels, "TILE_BYTES", 1)        # the smallest tile: 8 rows
    q = make(weight(shape, seed=4))
    x = torch.randn(6, shape[1], generator=torch.Generator().manual_seed(5))
    assert kernels.tile_rows(shape[1]) == 8 and shape[0] > 16
    assert_matches_reference(matmul(x, q), x, q.dequantize().float())


@cases("int8 sym", "int4 g32 sym", "nf4")
def test_bf16_input_comes_back_bf16(label, make, shape, kernel):
    q = make(weight(shape, seed=6))
    x = torch.randn(2, shape[1], generator=torch.Generator().manual_seed(7)).bfloat16()
    y = matmul(x, q)
    assert y.dtype == torch.bfloat16
    ref = x.float() @ q.dequantize().float().t()
    assert (y.float() - ref).abs().max() <= 0.01 * ref.abs().max()


def test_empty_batch():
    q = quantize_int(weight((32, 64)), 4, 32)
    assert matmul(torch.zeros(0, 64), q).shape == (0, 32)


def test_w8a8_equals_its_integer_reference():
    """y = (round(x / a_t) W8^T) a_t s, with a_t = max|x_t| / 127 per token, exact integer products."""
    w = weight((48, 96), seed=8)
    q = quantize_int(w, 8, None, True)
    plan = prepare(q, act_bits=8)
    assert kernel_name(plan) == "int8x8"
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(9))
    x[0, 0] = 0                                                                    # an all-zero token
    flat = x.reshape(-1, 96).double()
    a = flat.abs().amax(1, keepdim=True) / 127
    a[a == 0] = 1
    xq = torch.clamp(torch.round(flat / a), -127, 127)
    w8 = q.codes.double() - 128
    ref = (xq @ w8.t()) * a * q.scale.double().reshape(1, -1)
    y = matmul(x, plan)
    torch.testing.assert_close(y.reshape(-1, 48).double(), ref, rtol=1e-6, atol=1e-6)
    full = x @ q.dequantize().t()                                                 # the activations' rounding
    assert (y - full).norm() < 0.01 * full.norm()


def test_w8a8_needs_an_8_bit_symmetric_per_channel_weight():
    w = weight((32, 64))
    for q in (quantize_int(w, 4, 32), quantize_int(w, 8, None, False), quantize_int(w, 8, 32), quantize_nf4(w)):
        with pytest.raises(CompressError, match="act_bits=8: expected 8, with an 8-bit symmetric"):
            prepare(q, act_bits=8)
