"""Pruning (llmkit.compress.pruning, masks, sparsegpt) and the layer-by-layer calibration driver:
exact sparsity per layer and per N:M group, SparseGPT's layer error below magnitude's, the
driver's block inputs equal a plain forward's, block i calibrated on the pruned blocks before it
(against a hand loop of full forwards), identities at sparsity 0, and every bad input's error."""
from __future__ import annotations

import copy

import pytest
import torch

from llmkit.compress.errors import CompressError
from llmkit.compress.pruning import PRUNE_METHODS, prune
from llmkit.compress.sparsegpt import sparsegpt_prune_layer
from llmkit.compress.calibrate import capture_block_inputs, layerwise
from llmkit.compress.hessian import ColumnNormAccumulator, HessianAccumulator, hessian_of, layer_error
from llmkit.compress.masks import magnitude_score, n_m_mask, unstructured_mask, wanda_score
from llmkit.compress.targets import block_linears, linear_targets
from llmkit.config import ModelConfig
from llmkit.model.models import CausalLM


def tiny(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    fields = dict(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=128, max_seq_len=64, **overrides)
    return CausalLM(ModelConfig(**fields)).eval()


def calibration(n: int = 8, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows (n, dim) with a non-isotropic covariance and uneven feature scales (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    return torch.randn(n, dim, generator=g) @ mix * torch.rand(dim, generator=g).mul(3).add(0.1)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---- sparsity is exact ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", PRUNE_METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_sparsity_exact_per_layer(method, sparsity):
    model = tiny()
    report = prune(model, method, sparsity, calibration=calibration(), progress=False)
    for path, linear in linear_targets(model).items():
        zeros = linear.weight == 0                                                    # (out, in)
        if method == "wanda":           # compared within each output row: exact in every row
            assert (zeros.sum(1) == int(sparsity * linear.in_features)).all(), path
        else:                           # per layer (magnitude) / per block, summing to the layer (SparseGPT)
            assert int(zeros.sum()) == int(sparsity * linear.weight.numel()), path
        assert report["layers"][path] == pytest.approx(zeros.float().mean().item())
    total = sum(int((lin.weight == 0).sum()) for lin in linear_targets(model).values())
    assert report["sparsity"] == total / sum(lin.weight.numel() for lin in linear_targets(model).values())


@pytest.mark.parametrize("method", PRUNE_METHODS)
@pytest.mark.parametrize("n_m", ["2:4", (1, 4)])
def test_n_m_every_group_exact(method, n_m):
    model = tiny()
    report = prune(model, method, n_m=n_m, calibration=calibration(), progress=False)
    n, m = (2, 4) if n_m == "2:4" else n_m
    for linear in linear_targets(model).values():
        groups = (linear.weight != 0).reshape(linear.out_features, -1, m)            # (out, in/m, m)
        assert (groups.sum(-1) == n).all()
    assert report["sparsity"] == (m - n) / m and report["n_m"] == f"{n}:{m}"


def test_masks_keep_the_highest_scores():
    score = torch.rand(6, 16)
    keep = unstructured_mask(score, 0.25)
    # Every kept score of a row is above every pruned score of that row.
    for row, k in zip(score, keep):
        assert row[k].min() > row[~k].max() and (~k).sum() == 4
    layer = unstructured_mask(score, 0.25, per_row=False)
    assert score[layer].min() > score[~layer].max() and (~layer).sum() == 24
    nm = n_m_mask(score, 2, 4).reshape(6, 4, 4)
    groups = score.reshape(6, 4, 4)
    assert (groups.masked_fill(~nm, 2).amin(-1) > groups.masked_fill(nm, -1).amax(-1)).all()


def test_wanda_score_weights_columns_by_input_norm():
    w = torch.randn(4, 8)
    x = torch.randn(20, 8) * torch.arange(1, 9)
    acc = ColumnNormAccumulator(8)
    for part in x.split(7):
        acc.add(part)
    torch.testing.assert_close(wanda_score(w, acc.norms()), w.abs() * x.norm(dim=0), rtol=1e-6, atol=0)


# ---- SparseGPT ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_layer_error_below_magnitude(n_m):
    torch.manual_seed(0)
    w, x = torch.randn(48, 256), correlated_inputs(1024, 256)
    new, keep = sparsegpt_prune_layer(w, hessian_of(x), sparsity=0.5, n_m=n_m)
    assert torch.equal(new, new * keep) and int((new == 0).sum()) == w.numel() // 2
    score = magnitude_score(w)
    masks = [n_m_mask(score, *n_m)] if n_m else [unstructured_mask(score, 0.5),
                                                 unstructured_mask(score, 0.5, per_row=False)]
    sparse_error = layer_error(w, new, x)
    for mask in masks:
        assert sparse_error < 0.8 * layer_error(w, w * mask, x)
    # The OBS update is what helps: SparseGPT's own mask without the update is worse.
    assert sparse_error < layer_error(w, w * keep, x)


def test_sparsegpt_sparsity_zero_is_identity():
    w, x = torch.randn(16, 64), correlated_inputs(128, 64)
    new, keep = sparsegpt_prune_layer(w, hessian_of(x), sparsity=0.0)
    assert torch.equal(new, w) and keep.all()


def test_hessian_accumulates_in_chunks():
    x = correlated_inputs(300, 32)
    acc = HessianAccumulator(32)
    for part in x.split(64):
        acc.add(part.reshape(-1, 4, 32))                    # any leading shape: tokens are rows
    torch.testing.assert_close(acc.hessian.double(), 2 * x.double().T @ x.double() / 300, rtol=1e-5, atol=1e-6)
    assert acc.count == 300


# ---- identities --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_sparsity_zero_is_identity(method):
    model, ids = tiny(), calibration()
    before = logits(model, ids)
    report = prune(model, method, 0.0, calibration=ids, progress=False)
    assert torch.equal(logits(model, ids), before) and report["sparsity"] == 0.0


# ---- the layer-by-layer driver ---------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.inputs = []

    def add(self, x):
        self.inputs.append(x.clone())


def test_driver_block_inputs_equal_a_plain_forward():
    """Block 0's captured inputs, and every Linear's inputs in every block (unchanged weights), are
    what a plain forward of the model gives: the recorded mask / rope arguments chain correctly."""
    model, ids = tiny(), calibration(n=6)
    seen: dict[str, torch.Tensor] = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, p=p: seen.__setitem__(p, a[0].clone()))
             for p, lin in linear_targets(model).items()]
    block0 = []
    hooks.append(model.blocks()[0].register_forward_pre_hook(lambda m, a: block0.append(a[0].clone())))
    logits(model, ids)
    for h in hooks:
        h.remove()
    captured = capture_block_inputs(model, ids, chunk_size=4)
    assert [x.shape[0] for x, _ in captured] == [4, 2]
    assert torch.equal(torch.cat([x for x, _ in captured]), block0[0])
    recorders: dict[str, _Recorder] = {}
    layerwise(model, ids, lambda p, lin: recorders.setdefault(p, _Recorder()), lambda i, b, s: None,
              chunk_size=4, progress=False)
    assert recorders.keys() == seen.keys()
    for path, rec in recorders.items():
        torch.testing.assert_close(torch.cat(rec.inputs), seen[path], rtol=1e-5, atol=1e-5)


def _hand_loop(model, ids, method: str):
    """Block by block with FULL forwards of the partly pruned model: block i's statistics from
    the outputs of the pruned blocks before it."""
    paths = {id(m): n for n, m in model.named_modules()}
    for block in model.blocks():
        linears = block_linears(block, paths[id(block)] + ".")
        accs = {p: (ColumnNormAccumulator if method == "wanda" else HessianAccumulator)(lin.in_features)
                for p, lin in linears.items()}
        hooks = [lin.register_forward_pre_hook(lambda m, a, acc=accs[p]: acc.add(a[0]))
                 for p, lin in linears.items()]
        logits(model, ids)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for p, lin in linears.items():
                if method == "wanda":
                    lin.weight.mul_(unstructured_mask(wanda_score(lin.weight, accs[p].norms()), 0.5))
                else:
                    lin.weight.copy_(sparsegpt_prune_layer(lin.weight, accs[p].hessian, sparsity=0.5)[0])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_i_calibrates_on_the_pruned_blocks_before_it(method):
    ids = calibration(n=6)
    model, hand, unsequential = tiny(), tiny(), tiny()
    prune(model, method, 0.5, calibration=ids, chunk_size=4, progress=False)
    _hand_loop(hand, ids, method)
    for (path, a), b in zip(linear_targets(model).items(), linear_targets(hand).values()):
        assert torch.equal(a.weight == 0, b.weight == 0), path
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    # The check can fail: statistics from the UNPRUNED model give block 1 other weights.
    stats = {p: HessianAccumulator(lin.in_features) if method == "sparsegpt" else ColumnNormAccumulator(lin.in_features)
             for p, lin in linear_targets(unsequential).items()}
    hooks = [lin.register_forward_pre_hook(lambda m, a, acc=stats[p]: acc.add(a[0]))
             for p, lin in linear_targets(unsequential).items()]
    logits(unsequential, ids)
    for h in hooks:
        h.remove()
    q = "transformer.layers.1.self_attn.q_proj"
    lin = linear_targets(unsequential)[q]
    other = (lin.weight * unstructured_mask(wanda_score(lin.weight, stats[q].norms()), 0.5) if method == "wanda"
             else sparsegpt_prune_layer(lin.weight, stats[q].hessian, sparsity=0.5)[0])
    assert not torch.allclose(other, linear_targets(model)[q].weight, rtol=1e-4, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(method="random"), r"method='random': expected one of magnitude, wanda, sparsegpt"),
    (dict(method="magnitude", sparsity=1.0), r"sparsity=1.0: expected a fraction in \[0, 1\)"),
    (dict(method="magnitude", sparsity=-0.1), r"sparsity=-0.1: expected a fraction in \[0, 1\)"),
    (dict(method="magnitude", sparsity="0.5"), r"sparsity='0.5': expected a fraction"),
    (dict(method="wanda"), r"calibration=None: expected token ids"),
    (dict(method="sparsegpt"), r"calibration=None: expected token ids"),
    (dict(method="wanda", calibration=torch.rand(2, 8)), r"calibration=\(2, 8\): expected token ids"),
    (dict(method="magnitude", n_m="4:2"), r"n_m='4:2': expected 'N:M' or \(N, M\) with 0 < N < M"),
    (dict(method="magnitude", n_m="2-4"), r"n_m='2-4': expected 'N:M'"),
    (dict(method="magnitude", n_m=(2,)), r"n_m=\(2,\): expected 'N:M'"),
    (dict(method="magnitude", n_m="2:5"), r"n_m=2:5: transformer.layers.0.self_attn.q_proj has "
                                          r"in_features=64: expected a multiple of M=5"),
    (dict(method="sparsegpt", n_m="2:8", block_size=12, calibration="ids"),
     r"block_size=12: expected a multiple of M=8"),
    (dict(method="sparsegpt", damp=-1.0, calibration="ids"), r"damp=-1.0: expected a number >= 0"),
])
def test_bad_input_names_field_value_and_expectation(kwargs, message):
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    if isinstance(kwargs.get("calibration"), str):
        kwargs = {**kwargs, "calibration": calibration()}
    with pytest.raises(CompressError, match=message):
        prune(model, **kwargs, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # refused before any change
