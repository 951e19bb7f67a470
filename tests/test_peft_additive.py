"""Additive PEFT methods on one interface: serial and parallel adapters, CoDA, prompt tuning,
prefix tuning, P-tuning v2, APT and (IA)³ - identity at init, closed-form counts, disable, save /
load, two methods side by side, merge, folding, CoDA's soft top-k, generation, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import llmkit
import llmkit.peft as peft
from llmkit.generation import generate
from llmkit.model.cache import KVCache
from llmkit.peft import PeftError
from llmkit.peft.coda import soft_top_k

SMALL = {
    "serial_adapter": dict(bottleneck=8),
    "parallel_adapter": dict(bottleneck=8, heads=2),
    "coda": dict(bottleneck=8, token_reduction=3),
    "prompt_tuning": dict(num_virtual_tokens=4),
    "prefix_tuning": dict(num_virtual_tokens=4, encoder_hidden_size=16),
    "p_tuning_v2": dict(num_virtual_tokens=4),
    "apt": dict(num_virtual_tokens=4),
    "ia3": {},
}
ENCODER_ONLY = {"coda", "apt"}
IDENTITY_AT_INIT = {"serial_adapter", "parallel_adapter", "ia3"}


def model_for(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    return llmkit.build_model(llmkit.get_preset(preset)).eval()


def ids(vocab=512, shape=(2, 10), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randomize(handle, seed=3):
    """Move every trainable adapter tensor off its init, so equalities below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def cases():
    for method in SMALL:
        presets = ["bert-tiny"] if method in ENCODER_ONLY else ["llama-tiny", "gpt2-tiny", "bert-tiny"]
        for preset in presets:
            yield method, preset


CASES = list(cases())


def expected_count(method: str, cfg) -> int:
    """The closed forms of the methods' docstrings, from the config alone."""
    d, L, d_ff = cfg.d_model, cfg.n_layers, cfg.d_ff
    d_kv = cfg.kv_heads * cfg.dim_per_head
    o = SMALL[method]
    if method == "serial_adapter":                        # houlsby: two slots per block
        return L * 2 * (2 * d * o["bottleneck"] + o["bottleneck"] + d)
    if method == "parallel_adapter":                      # one FFN slot, block-diagonal over heads
        return L * (2 * d * o["bottleneck"] // o["heads"] + o["bottleneck"] + d)
    if method == "coda":                                  # router w per sublayer + a parallel adapter each
        return L * 2 * (d + 2 * d * o["bottleneck"] + o["bottleneck"] + d)
    p = o.get("num_virtual_tokens")
    if method == "prompt_tuning":
        return p * d
    if method == "prefix_tuning":
        h = o["encoder_hidden_size"]
        return p * d + h * d + h + L * 2 * d_kv * (h + 1)
    if method == "p_tuning_v2":
        return L * p * 2 * d_kv
    if method == "apt":
        return L * (p * 2 * d_kv + d * p + p + 1)
    if method == "ia3":                                   # l_k, l_v on outputs, l_ff on the FFN input
        return L * (2 * d_kv + d_ff)
    raise AssertionError(method)


@pytest.mark.parametrize("method,preset", CASES)
def test_counts_disable_identity_and_round_trip(method, preset, tmp_path):
    model = model_for(preset)
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    handle = peft.apply(model, method, **SMALL[method])
    count = handle.trainable_parameters().count
    assert count == expected_count(method, model.config) == handle.expected_trainable()
    with torch.no_grad():
        if method in IDENTITY_AT_INIT:
            assert (model(x).logits - base).abs().max() < 1e-6
        randomize(handle)
        adapted = model(x).logits
        assert (adapted - base).abs().max() > 1e-3              # the adapter does something
        with handle.disable():
            assert torch.equal(model(x).logits, base)
        assert torch.equal(model(x).logits, adapted)
    handle.save(tmp_path / "a")
    fresh = model_for(preset)
    peft.load(fresh, tmp_path / "a")
    with torch.no_grad():
        assert (fresh(x).logits - adapted).abs().max() < 1e-6


@pytest.mark.parametrize("preset", ["llama-tiny", "bert-tiny"])
def test_two_methods_on_one_model_switched_by_name(preset, tmp_path):
    model = model_for(preset)
    x = ids()
    singles = {}
    for name, method in (("ia3", "ia3"), ("adapter", "serial_adapter"), ("prompt", "prompt_tuning"),
                         ("prefix", "p_tuning_v2")):
        alone = model_for(preset)
        h = peft.apply(alone, method, adapter_name=name, **SMALL[method])
        randomize(h, seed=len(singles))
        with torch.no_grad():
            singles[name] = alone(x).logits
        h.save(tmp_path / name)
        peft.load(model, tmp_path / name)
    handle = peft.handle_of(model)
    assert sorted(handle.adapters) == ["adapter", "ia3", "prefix", "prompt"]
    for name in ["prefix", "ia3", "prompt", "adapter", "ia3"]:
        handle.set_active(name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in n or n.endswith(f".{name}") for n in trainable)
        with torch.no_grad():
            assert (model(x).logits - singles[name]).abs().max() < 1e-5
    handle.delete_adapter("prompt")
    handle.set_active("prefix")
    with torch.no_grad():
        assert (model(x).logits - singles["prefix"]).abs().max() < 1e-5


def test_serial_adapter_formula_and_pfeiffer_placement():
    model = model_for("llama-tiny")
    handle = peft.apply(model, "serial_adapter", bottleneck=8, placement="pfeiffer", activation="gelu")
    block = model.transformer.layers[0]
    assert block.post_attn_adapter is None and block.post_mlp_adapter is not None
    randomize(handle)
    a = block.post_mlp_adapter.adapters["default"]
    h = torch.randn(2, 5, 64)
    expected = h + nn.functional.gelu(h @ a.down[0].t() + a.down_bias) @ a.up[0].t() + a.up_bias
    assert torch.allclose(block.post_mlp_adapter(h), expected, atol=1e-6)


def test_parallel_adapter_scale_and_multi_head_are_block_diagonal():
    model = model_for("gpt2-tiny")
    handle = peft.apply(model, "parallel_adapter", bottleneck=8, heads=2, scale=4.0, sublayer="attn")
    randomize(handle)
    a = model.transformer.layers[1].parallel_attn.adapters["default"]
    h = torch.randn(3, 64)
    down = torch.block_diag(*a.down)                       # (m, d) from the two (m/2, d/2) groups
    up = torch.block_diag(*a.up)                           # (d, m)
    expected = 4.0 * (torch.relu(h @ down.t() + a.down_bias) @ up.t() + a.up_bias)
    assert torch.allclose(a(h), expected, atol=1e-5)


def test_ia3_merge_equals_unmerged_and_unmerge_restores():
    for preset in ("llama-tiny", "gpt2-tiny", "bert-tiny"):
        model = model_for(preset)
        weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
        handle = peft.apply(model, "ia3")
        randomize(handle)
        x = ids()
        with torch.no_grad():
            unmerged = model(x).logits
            handle.merge()
            assert (model(x).logits - unmerged).abs().max() < 1e-5
            handle.unmerge()
            assert (model(x).logits - unmerged).abs().max() < 1e-5
        for n, t in weights.items():
            now = dict(model.named_parameters()).get(n.replace(".weight", ".base_layer.weight")
                                                     .replace(".bias", ".base_layer.bias"))
            if now is not None:
                assert (now - t).abs().max() < 1e-5, n
        merged = peft.handle_of(model).merge_and_unload()
        with torch.no_grad():
            assert (merged(x).logits - unmerged).abs().max() < 1e-5


def test_ia3_feedforward_scales_the_intermediate_activation():
    model = model_for("llama-tiny")
    handle = peft.apply(model, "ia3")
    randomize(handle)
    mlp = model.transformer.layers[0].mlp
    l_ff = mlp.down_proj.adapters["default"].ia3_l
    l_k = model.transformer.layers[0].self_attn.k_proj.adapters["default"].ia3_l
    h = torch.randn(2, 3, 64)
    inner = nn.functional.silu(h @ mlp.gate_proj.weight.t()) * (h @ mlp.up_proj.weight.t())
    assert torch.allclose(mlp(h), (inner * l_ff) @ mlp.down_proj.base_layer.weight.t(), atol=1e-5)
    k = model.transformer.layers[0].self_attn.k_proj
    assert torch.allclose(k(h), (h @ k.base_layer.weight.t()) * l_k, atol=1e-6)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_prefix_mlp_equals_folded_prefix(preset, tmp_path):
    model = model_for(preset)
    handle = peft.apply(model, "prefix_tuning", num_virtual_tokens=5, encoder_hidden_size=24)
    randomize(handle)
    x = ids()
    with torch.no_grad():
        through_mlp = model(x).logits
    handle.fold()
    assert handle.adapters["default"].config.projection is False
    assert not any(".mlp.transform." in n for n, _ in model.named_parameters())        # the MLP is gone
    with torch.no_grad():
        assert (model(x).logits - through_mlp).abs().max() < 1e-6
    handle.save(tmp_path / "folded")
    fresh = model_for(preset)
    peft.load(fresh, tmp_path / "folded")
    with torch.no_grad():
        assert (fresh(x).logits - through_mlp).abs().max() < 1e-6


def test_apt_with_unit_gate_and_scale_is_p_tuning_v2():
    model = model_for("bert-tiny")
    h_apt = peft.apply(model, "apt", adapter_name="apt", num_virtual_tokens=4)
    peft.apply(model, "p_tuning_v2", adapter_name="v2", num_virtual_tokens=4)
    randomize(h_apt)
    x = ids()
    with torch.no_grad():
        for block in model.transformer.layers:
            slot = block.self_attn.kv_prefix
            slot.adapters["v2"].prefix.copy_(slot.adapters["apt"].prefix)
            gate = slot.adapters["apt"]
            gate.gate.weight.zero_()
            gate.gate.bias.fill_(torch.inf)                  # α = sigmoid(inf) = 1 exactly
            gate.scale.fill_(1.0)                            # λ = 1
        h_apt.set_active("apt")
        apt = model(x).logits
        h_apt.set_active("v2")
        v2 = model(x).logits
        assert torch.equal(apt, v2)
        # and the gate does act: λ = 1/2 is not P-tuning v2
        for block in model.transformer.layers:
            block.self_attn.kv_prefix.adapters["apt"].scale.fill_(0.5)
        h_apt.set_active("apt")
        assert (model(x).logits - v2).abs().max() > 1e-3


def test_prompt_tuning_equals_prepending_its_embeddings():
    model = model_for("llama-tiny")
    handle = peft.apply(model, "prompt_tuning", num_virtual_tokens=3, init="text",
                        init_token_ids=[5, 6])
    prompt = model.transformer.input_prompt.adapters["default"].prompt
    assert torch.equal(prompt, model.transformer.embed_tokens.weight[[5, 6, 5]])   # repeated to p
    x = ids(shape=(1, 6))
    with torch.no_grad():
        adapted = model(x).logits
        with handle.disable():
            full = model(torch.cat([torch.tensor([[5, 6, 5]]), x], 1)).logits[:, 3:]
    assert (adapted - full).abs().max() < 1e-5


def test_prompt_init_from_text_with_a_tokenizer():
    from llmkit.tokenizer import train_char
    tok = train_char(texts=["hello world"])
    model = llmkit.build_model(llmkit.get_preset("gpt2-tiny", vocab_size=tok.vocab_size)).eval()
    handle = peft.apply(model, "prompt_tuning", num_virtual_tokens=4, init="text", init_text="hello", tokenizer=tok)
    assert handle.adapters["default"].config.init_token_ids == tok.encode("hello")
    assert "tokenizer" not in handle.adapters["default"].config.to_dict()


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning_v2"])
@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_cached_decoding_equals_full_forward(method, preset):
    model = model_for(preset)
    randomize(peft.apply(model, method, **SMALL[method]))
    x = ids(shape=(2, 9))
    with torch.no_grad():
        full = model(x).logits
        cache, steps = KVCache(), []
        for start, end in ((0, 5), (5, 6), (6, 9)):
            steps.append(model(x[:, start:end], cache=cache).logits)
    assert (full - torch.cat(steps, 1)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_left_padded_generation_equals_single_prompts(method):
    model = model_for("llama-tiny")
    randomize(peft.apply(model, method, **SMALL[method]))
    short, long = ids(shape=(1, 4), seed=5), ids(shape=(1, 7), seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.tensor([[0, 0, 0, 1, 1, 1, 1]]), torch.ones(1, 7, dtype=torch.long)])
    together = generate(model, batch, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(together[0, 7:], generate(model, short, max_new_tokens=6)[0, 4:])
    assert torch.equal(together[1, 7:], generate(model, long, max_new_tokens=6)[0, 7:])


def test_prompt_and_prefix_on_the_encoder_decoder():
    for method in ("prompt_tuning", "prefix_tuning", "serial_adapter", "ia3", "coda"):
        model = model_for("bart-tiny")
        handle = peft.apply(model, method, **SMALL[method])
        if method == "prompt_tuning":                       # the encoder's input only
            assert model.transformer.decoder.input_prompt is None
        if method == "coda":                                # the encoder's blocks only
            assert all(b.route_mlp is None for b in model.transformer.decoder.layers)
        randomize(handle)
        x = ids(shape=(2, 8))
        with torch.no_grad():
            out = model(x).logits
            with handle.disable():
                base = model(x).logits
        assert out.shape == base.shape and (out - base).abs().max() > 1e-4
        generate(model, x, max_new_tokens=3)


# ---- CoDA --------------------------------------------------------------------------------------

def test_soft_top_k_sums_to_k_and_hardens_as_epsilon_shrinks():
    s = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 6, 11):
        for eps in (10.0, 1.0, 0.1):
            lam = soft_top_k(s, k, eps)
            assert lam.min() >= 0 and lam.max() <= 1
            assert torch.allclose(lam.sum(-1), torch.full((4,), float(k)), atol=1e-4)
        hard = torch.zeros_like(s).scatter(1, s.topk(k, -1).indices, 1.0)
        assert (soft_top_k(s, k, 1e-4) - hard).abs().max() < 1e-3
        assert (soft_top_k(s, k, 1.0) - hard).abs().max() > 0.05       # a soft one is not hard
    # differentiable in the scores (through τ's closed form), and finite at a small ε
    for eps, scale in ((1.0, 1.0), (1e-3, 50.0)):
        scores = (s.detach() * scale).requires_grad_(True)
        (soft_top_k(scores, 3, eps) * torch.arange(12.0)).sum().backward()
        assert torch.isfinite(scores.grad).all()
        if eps == 1.0:
            assert scores.grad.abs().sum() > 0


def test_coda_sublayers_see_exactly_k_tokens():
    model = model_for("bert-tiny")
    handle = peft.apply(model, "coda", bottleneck=8, token_reduction=3)
    seen = []
    for block in model.transformer.layers:
        block.mlp.register_forward_hook(lambda m, args, out: seen.append(("mlp", args[0].shape)))
        block.self_attn.register_forward_hook(lambda m, args, out: seen.append(("attn", args[0].shape)))
    x = ids(shape=(2, 10))
    with torch.no_grad():
        model(x, attention_mask=torch.ones_like(x))
    k = math.ceil(10 / 3)
    assert len(seen) == 4 and all(shape == (2, k, 64) for _, shape in seen)
    seen.clear()
    with handle.disable(), torch.no_grad():
        model(x)
    assert all(shape == (2, 10, 64) for _, shape in seen)


def test_coda_with_no_reduction_and_zero_adapter_is_the_base_model():
    """r = 1 selects every token with λ = 1 and the zero-initialised adapter adds nothing."""
    model = model_for("bert-tiny")
    x = ids()
    with torch.no_grad():
        base = model(x, attention_mask=torch.ones_like(x)).logits
        peft.apply(model, "coda", bottleneck=8, token_reduction=1)
        assert (model(x, attention_mask=torch.ones_like(x)).logits - base).abs().max() < 1e-5


def test_coda_trains_the_router():
    model = model_for("bert-tiny")
    handle = peft.apply(model, "coda", bottleneck=8, token_reduction=2)
    x = ids()
    model.train()
    model(x).logits.square().mean().backward()
    router = model.transformer.layers[0].route_mlp.adapters["default"].router
    assert router.grad is not None and router.grad.abs().sum() > 0


# ---- bad input ---------------------------------------------------------------------------------

def test_a_method_on_a_model_without_its_site():
    with pytest.raises(PeftError, match=r"coda: CausalLM has no site .*bidirectional"):
        peft.apply(model_for("llama-tiny"), "coda")
    with pytest.raises(PeftError, match=r"apt: CausalLM has no site .*bidirectional"):
        peft.apply(model_for("gpt2-tiny"), "apt")
    with pytest.raises(PeftError, match=r"prompt_tuning: Sequential has no site .*input_prompt"):
        peft.apply(nn.Sequential(nn.Linear(4, 4)), "prompt_tuning")


def test_bad_options_name_the_field_and_value():
    with pytest.raises(PeftError, match=r"reduction_factor=128: expected at most the hidden size d=64"):
        peft.apply(model_for("llama-tiny"), "serial_adapter", reduction_factor=128)
    for method in ("prompt_tuning", "prefix_tuning", "p_tuning_v2", "apt"):
        for bad in (0, -3):
            with pytest.raises(PeftError, match=rf"num_virtual_tokens={bad}: expected a positive integer"):
                peft.apply(model_for("bert-tiny"), method, num_virtual_tokens=bad)
    with pytest.raises(PeftError, match=r"placement='middle'"):
        peft.apply(model_for("llama-tiny"), "serial_adapter", placement="middle")
    with pytest.raises(PeftError, match=r"init='text': give init_text"):
        peft.apply(model_for("llama-tiny"), "prompt_tuning", init="text")
    model = model_for("llama-tiny")
    with pytest.raises(PeftError, match="did you mean 'num_virtual_tokens'"):
        peft.apply(model, "prompt_tuning", num_virtual_token=4)
    assert peft.handle_of(model) is None                 # nothing half-applied
