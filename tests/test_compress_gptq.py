"""GPTQ (llmkit.compress.gptq) and the shared Hessian machinery: layer reconstruction error below
round-to-nearest's at int4 and int3, RTN exactly when the Hessian is diagonal, the returned codes
dequantize to the weights GPTQ settled on, the damped inverse Cholesky factor and dead columns,
end to end on a tiny CausalLM, and bad input."""
from __future__ import annotations

import pytest
import torch

from llmkit.compress.errors import CompressError
from llmkit.compress.gptq import gptq_model, gptq_quantize_layer
from llmkit.compress.hessian import hessian_of, inverse_cholesky, layer_error
from llmkit.compress.intq import quantize_int
from llmkit.compress.targets import linear_targets
from llmkit.config import ModelConfig
from llmkit.model.models import CausalLM


def tiny(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=128, max_seq_len=64)).eval()


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows (n, dim) with a non-isotropic covariance and uneven feature scales (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    return torch.randn(n, dim, generator=g) @ mix * torch.rand(dim, generator=g).mul(3).add(0.1)


@pytest.mark.parametrize("bits, group_size, symmetric", [
    (4, 32, True), (4, 64, False), (4, None, True), (3, 32, True), (3, None, False), (3, 256, True)])
def test_gptq_layer_error_below_rtn(bits, group_size, symmetric):
    torch.manual_seed(0)
    w, x = torch.randn(48, 256), correlated_inputs(1024, 256)
    packed = gptq_quantize_layer(w, hessian_of(x), bits=bits, group_size=group_size, symmetric=symmetric)
    rtn = quantize_int(w, bits, group_size, symmetric)
    assert packed.bits == bits and packed.group_size == (group_size or 256) and packed.codes.max() < 2 ** bits
    assert layer_error(w, packed.dequantize(), x) < 0.7 * layer_error(w, rtn.dequantize(), x)


@pytest.mark.parametrize("group_size", [16, None])
def test_gptq_with_a_diagonal_hessian_is_rtn(group_size):
    """A diagonal H gives a diagonal inverse factor: no error flows to other columns, every grid is
    the one of the untouched weights, so GPTQ's codes are round-to-nearest's, bit for bit."""
    w = torch.randn(8, 64)
    hessian = torch.diag(torch.rand(64) + 0.5)
    packed = gptq_quantize_layer(w, hessian, bits=4, group_size=group_size, symmetric=False, block_size=32)
    rtn = quantize_int(w, 4, group_size, symmetric=False)
    assert torch.equal(packed.codes, rtn.codes) and torch.equal(packed.scale, rtn.scale)
    assert torch.equal(packed.zero, rtn.zero)


def test_gptq_block_size_does_not_change_the_math():
    """Lazy batch updates are a reordering of the same sums: block sizes 128, 32, 8 agree."""
    w, x = torch.randn(16, 128), correlated_inputs(512, 128)
    h = hessian_of(x)
    ref = gptq_quantize_layer(w, h, bits=4, group_size=32, block_size=128)
    for block_size in (32, 8):
        other = gptq_quantize_layer(w, h, bits=4, group_size=32, block_size=block_size)
        assert (other.codes != ref.codes).float().mean() < 0.01  # a rare code may flip on float rounding
        torch.testing.assert_close(other.scale, ref.scale, rtol=1e-5, atol=0)
        assert layer_error(w, other.dequantize(), x) == pytest.approx(layer_error(w, ref.dequantize(), x), rel=0.02)


def test_inverse_cholesky_of_the_damped_hessian_and_dead_columns():
    x = correlated_inputs(256, 16)
    x[:, 3] = 0                                                  # a dead input feature
    h = hessian_of(x).double()
    U, dead = inverse_cholesky(h, damp=0.05)
    assert dead.tolist() == [i == 3 for i in range(16)]
    fixed = h.clone()
    fixed[3, 3] = 1.0
    fixed += 0.05 * torch.diagonal(fixed).mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(U.double().T @ U.double(), torch.linalg.inv(fixed), rtol=1e-4, atol=1e-6)
    assert torch.equal(U, U.triu())
    w = torch.randn(4, 16)
    packed = gptq_quantize_layer(w, hessian_of(x), bits=4, group_size=None)
    assert packed.dequantize()[:, 3].abs().max() == 0            # a dead column is zeroed, nothing is NaN
    assert torch.isfinite(packed.dequantize()).all()


def test_gptq_model_end_to_end():
    model, ids = tiny(), torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    reference, rtn = tiny(), tiny()
    with torch.no_grad():
        for lin in linear_targets(rtn).values():
            lin.weight.copy_(quantize_int(lin.weight, 3, 32, True).dequantize())
    results = gptq_model(model, ids, bits=3, group_size=32, chunk_size=3, progress=False)
    targets = linear_targets(model)
    assert results.keys() == targets.keys()
    for path, packed in results.items():
        assert torch.equal(targets[path].weight, packed.dequantize())     # the model holds the GPTQ weights
        assert packed.codes.max() < 8
    with torch.no_grad():
        full, gptq, rounded = (m(ids).last_hidden_state for m in (reference, model, rtn))
    assert torch.isfinite(gptq).all()
    # On its calibration data the GPTQ model's hidden states are closer to fp32 than RTN's.
    assert (gptq - full).pow(2).mean() < (rounded - full).pow(2).mean()


@pytest.mark.parametrize("call, message", [
    (lambda w, h: gptq_quantize_layer(w, h, bits=5.0, group_size=32), r"bits=5.0: expected an integer in 2..8"),
    (lambda w, h: gptq_quantize_layer(w, h, bits=9, group_size=32), r"bits=9: expected an integer in 2..8"),
    (lambda w, h: gptq_quantize_layer(w, h, group_size=24), r"group_size=24 does not divide the input dimension 64"),
    (lambda w, h: gptq_quantize_layer(w, h, group_size=32, block_size=48),
     r"block_size=48: a group of group_size=32 columns starting at column 32 crosses a block end"),
    (lambda w, h: gptq_quantize_layer(w, h[:8, :8], group_size=32), r"hessian shape \(8, 8\): expected \(64, 64\)"),
    (lambda w, h: gptq_quantize_layer(w, h, group_size=32, damp=-0.1), r"damp=-0.1: expected a number >= 0"),
    (lambda w, h: gptq_model(tiny(), None), r"gptq: calibration=None: expected token ids"),
    (lambda w, h: gptq_model(tiny(), torch.zeros(4, dtype=torch.long)), r"gptq: calibration=\(4,\): expected"),
    (lambda w, h: gptq_model(tiny(), torch.zeros(2, 4, dtype=torch.long), group_size=48),
     r"group_size=48 does not divide the input dimension 64 of transformer.layers.0.self_attn.q_proj"),
])
def test_bad_input_names_field_value_and_expectation(call, message):
    w = torch.randn(16, 64)
    with pytest.raises(CompressError, match=message):
        call(w, hessian_of(correlated_inputs(128, 64)))
