"""compress.quantization: QuantLinear equals its dequantized weight's Linear, state_dict round trips,
quantize() on a tiny CausalLM (int8 close to fp32, generate() and the engine agree token for
token), bf16 autocast, GPTQ wiring, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmkit.compress import CompressError
from llmkit.compress.quantization import SCHEMES, QuantLinear, quantize
from llmkit.compress.targets import linear_targets
from llmkit.config import ModelConfig
from llmkit.generation import generate
from llmkit.infer import Engine, SamplingParams
from llmkit.model.models import CausalLM

# scheme, keyword arguments of quantize / from_linear
VARIANTS = [("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 32, "symmetric": False}),
            ("int3", {"group_size": 32}), ("nf4", {}), ("nf4", {"double_quant": True}), ("w8a8", {})]
IDS = ["int8", "int4", "int4-asym", "int3", "nf4", "nf4-dq", "w8a8"]
WEIGHT_ONLY = VARIANTS[:-1]


def tiny(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=128, max_seq_len=64, **overrides)
    return CausalLM(config).eval()


def ids(batch=2, length=8, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme,kw", WEIGHT_ONLY, ids=IDS[:-1])
def test_quant_linear_equals_linear_of_its_dequantized_weight(scheme, kw):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = QuantLinear.from_linear(linear, scheme, **kw)
    x = torch.randn(3, 5, 64)
    ref = nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert rel_error(layer.dequantized_weight(), linear.weight.detach()) < 0.2      # and near the original


@pytest.mark.parametrize("scheme,kw", VARIANTS, ids=IDS)
def test_state_dict_round_trip_is_bitwise(scheme, kw):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 32), scheme, **kw)
    fresh = QuantLinear(64, 32, scheme=scheme, bias=True, **kw)
    x = torch.randn(4, 64)
    fresh(x)                                           # a stale kernel plan must not survive the load
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())


def test_quantize_replaces_every_block_linear_and_keeps_the_rest():
    model = tiny()
    before = copy.deepcopy(model)
    paths = list(linear_targets(model))
    assert quantize(model, "int4", group_size=32, progress=False) is model
    modules = dict(model.named_modules())
    assert all(isinstance(modules[p], QuantLinear) for p in paths) and not linear_targets(model)
    assert torch.equal(model.transformer.embed_tokens.weight, before.transformer.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, before.lm_head.weight) and isinstance(model.lm_head, nn.Linear)
    cfg = model.quantization_config
    assert cfg == {"scheme": "int4", "bits": 4, "group_size": 32, "symmetric": True, "method": "rtn",
                   "double_quant": False, "modules": paths}
    assert {modules[p].kernel for p in paths} == {"int4pack"}


def test_int8_logits_are_close_to_fp32_and_closer_than_int4():
    model, tokens = tiny(), ids()
    ref = logits(model, tokens)
    err = {s: rel_error(logits(quantize(tiny(), s, group_size=32, progress=False), tokens), ref)
           for s in ("int8", "w8a8", "int4", "int3")}
    assert err["int8"] < 0.01 and err["w8a8"] < 0.02
    assert err["int8"] < err["int4"] < err["int3"] and err["w8a8"] < err["int4"]


@pytest.mark.parametrize("scheme,kw", VARIANTS, ids=IDS)
def test_generate_and_engine_agree_on_a_quantized_model(scheme, kw):
    model = quantize(tiny(), scheme, progress=False, **kw)
    prompts = ids(2, 6, seed=3)
    seqs = generate(model, prompts, max_new_tokens=8)                             # greedy
    engine = Engine(model, max_num_seqs=4)
    out = engine.generate([p.tolist() for p in prompts], SamplingParams(max_tokens=8, temperature=0))
    assert [seq[6:].tolist() for seq in seqs] == out


def test_bf16_autocast_runs_close_to_fp32():
    model, tokens = quantize(tiny(), "int4", group_size=32, progress=False), ids()
    ref = logits(model, tokens)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens).logits
    assert rel_error(low.float(), ref) < 0.05


def test_biases_are_kept():
    model, tokens = tiny(attn_bias=True), ids()
    with torch.no_grad():
        for layer in linear_targets(model).values():
            if layer.bias is not None:
                layer.bias.normal_()
    ref = logits(model, tokens)
    quantize(model, "int8", progress=False)
    q = model.transformer.layers[0].self_attn.q_proj
    assert q.bias is not None and rel_error(logits(model, tokens), ref) < 0.01


def test_gptq_layers_hold_what_gptq_model_chose():
    gptq = pytest.importorskip("llmkit.compress.gptq")
    calibration = ids(4, 16, seed=5)
    reference = tiny()
    chosen = gptq.gptq_model(reference, calibration, bits=4, group_size=32, symmetric=True, progress=False)
    model = quantize(tiny(), "int4", group_size=32, method="gptq", calibration=calibration, progress=False)
    modules = dict(model.named_modules())
    assert set(chosen) == set(model.quantization_config["modules"])
    for path, q in chosen.items():
        assert torch.equal(modules[path].dequantized_weight(), q.dequantize())
    assert model.quantization_config["method"] == "gptq"


# ---- bad input -------------------------------------------------------------------------------------

def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(CompressError, match="scheme='int5': expected one of int8, int4, int3, nf4, w8a8"):
        quantize(tiny(), "int5")
    assert SCHEMES == ("int8", "int4", "int3", "nf4", "w8a8")


def test_unknown_method_names_the_known_ones():
    with pytest.raises(CompressError, match="method='awq': expected one of rtn, gptq"):
        quantize(tiny(), "int4", method="awq")


def test_gptq_needs_calibration_data():
    with pytest.raises(CompressError, match="method='gptq' needs calibration data: calibration=None"):
        quantize(tiny(), "int4", method="gptq")


def test_w8a8_is_symmetric_only():
    with pytest.raises(CompressError, match="scheme='w8a8' with symmetric=False: expected symmetric=True"):
        quantize(tiny(), "w8a8", symmetric=False)


def test_nf4_with_gptq_is_refused():
    with pytest.raises(CompressError, match="scheme='nf4' with method='gptq' is not supported"):
        quantize(tiny(), "nf4", method="gptq", calibration=ids())


def test_group_size_not_dividing_names_the_layer_and_changes_nothing():
    model = tiny()
    with pytest.raises(CompressError, match=r"group_size=48 does not divide the input dimension 64 of layer "
                                            r"'transformer\.layers\.0\.self_attn\.q_proj'"):
        quantize(model, "int4", group_size=48)
    assert len(linear_targets(model)) == 14 and not hasattr(model, "quantization_config")


def test_quantizing_twice_is_refused():
    model = quantize(tiny(), "int8", progress=False)
    with pytest.raises(CompressError, match="no nn.Linear inside its blocks"):
        quantize(model, "int8")
