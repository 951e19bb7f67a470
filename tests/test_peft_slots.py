"""Adapters own the model's slots: a block-slot bottleneck (post_attn_adapter), a kv_prefix and a
wrapped Linear (LoRA) on one tiny llmkit model are frozen/trained, saved/loaded, disabled and
deleted alike by the handle. The two slot methods are test-only (the real ones come later)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import llmkit
import llmkit.peft as peft
from llmkit.align.logps import causal_lm_logps
from llmkit.model import AdapterSite, AdapterSlot
from llmkit.peft import AdapterConfig, Method, PeftError, register


class Bottleneck(nn.Module):
    """x + W_up relu(W_down x), W_up = 0 at init (Houlsby et al., 2019)."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.down, self.up = nn.Linear(d, k), nn.Linear(k, d)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x)))


class Prefix(nn.Module):
    """P trained key/value positions per attention module: (1, n_kv, P, hd) each."""

    def __init__(self, n_kv: int, length: int, head_dim: int):
        super().__init__()
        self.k, self.v = (nn.Parameter(torch.zeros(1, n_kv, length, head_dim)) for _ in range(2))

    def forward(self, x):
        return self.k.expand(x.shape[0], -1, -1, -1), self.v.expand(x.shape[0], -1, -1, -1)


@dataclass
class BottleneckConfig(AdapterConfig):       # no rank: a method holds only its own fields
    size: int = 4


@dataclass
class PrefixConfig(AdapterConfig):
    length: int = 3


@pytest.fixture(scope="module", autouse=True)
def slot_methods():
    @register
    class TestBottleneck(Method):
        name, config_class, placement, slot, default_targets = (
            "test_bottleneck", BottleneckConfig, "slot", "post_attn_adapter", None)

        def make_adapter(self, block, config):
            return Bottleneck(block.attn_norm.weight.shape[0], config.size)

        def trainable_count(self, block, config):
            d = block.attn_norm.weight.shape[0]
            return 2 * d * config.size + config.size + d

    @register
    class TestPrefix(Method):
        name, config_class, placement, slot, default_targets = (
            "test_kv_prefix", PrefixConfig, "slot", "kv_prefix", None)

        def make_adapter(self, attention, config):
            return Prefix(attention.n_kv_heads, config.length, attention.head_dim)

        def trainable_count(self, attention, config):
            return 2 * attention.n_kv_heads * config.length * attention.head_dim
    yield
    for name in ("test_bottleneck", "test_kv_prefix"):
        peft.METHODS.pop(name)


def tiny():
    torch.manual_seed(0)
    return llmkit.build_model(llmkit.get_preset("llama-tiny")).eval()


def ids():
    return torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))


KINDS = {"lora": ".self_attn.q_proj.adapters.lora.", "bottleneck": ".post_attn_adapter.adapters.bottleneck.",
         "prefix": ".self_attn.kv_prefix.adapters.prefix."}


def three_kinds(model):
    handle = peft.apply(model, "lora", adapter_name="lora", r=2, targets=["q_proj"])
    peft.apply(model, "test_bottleneck", adapter_name="bottleneck", size=4)
    peft.apply(model, "test_kv_prefix", adapter_name="prefix", length=3)
    handle.set_active(list(KINDS))
    return handle


def randomize(handle, scale=0.3):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, adapter in handle.adapter_modules():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_slot_and_layer_adapters_train_save_load_and_disable(tmp_path):
    model, x = tiny(), ids()
    base = copy.deepcopy(model)                          # the model before any adapter
    base_logits = base(x).logits
    handle = three_kinds(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".adapters." in n}
    assert all(any(mark in n for n in trainable) for mark in KINDS.values())
    assert handle.trainable_parameters().count == handle.expected_trainable() == (
        2 * 2 * (64 + 64) + 2 * (2 * 64 * 4 + 4 + 64) + 2 * 2 * 2 * 3 * 16)

    randomize(handle)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)    # every parameter: only adapters may move
    model.train()
    for _ in range(3):
        model(x).logits.logsumexp(-1).mean().backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
        opt.step()
        opt.zero_grad()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and all(any(mark in n for n in changed) for mark in KINDS.values())

    adapted = model(x).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    with handle.disable():
        assert torch.equal(model(x).logits, base_logits)
    assert torch.equal(model(x).logits, adapted)

    handle.save(tmp_path)
    fresh = tiny()
    loaded = peft.load(fresh, tmp_path)
    assert sorted(loaded.active) == sorted(KINDS)
    state, fresh_state = model.state_dict(), fresh.state_dict()
    assert set(state) == set(fresh_state) and all(torch.equal(state[k], fresh_state[k]) for k in state)
    assert torch.equal(fresh(x).logits, adapted)
    with pytest.raises(PeftError, match="LoRA-shaped"):
        handle.save(tmp_path / "hf", format="peft", adapter_name="bottleneck")


def test_kv_prefix_reference_under_disable_is_the_base_model_bitwise():
    """DPO's reference is `handle.disable()`: with a trained (non-zero) prefix it must be the base."""
    model, x = tiny(), ids()
    base = copy.deepcopy(model)
    handle = peft.apply(model, "test_kv_prefix", length=4, targets=["self_attn"])
    randomize(handle)
    mask = torch.ones(2, 8)
    mask[:, :3] = 0
    assert not torch.equal(model(x).logits, base(x).logits)
    with torch.no_grad(), handle.disable():
        assert torch.equal(model(x).logits, base(x).logits)
        assert torch.equal(causal_lm_logps(model, x, None, mask), causal_lm_logps(base, x, None, mask))


def test_delete_adapter_restores_the_plain_model():
    model, x = tiny(), ids()
    base = copy.deepcopy(model)
    handle = three_kinds(model)
    randomize(handle)
    for name in KINDS:
        handle.delete_adapter(name)
    assert not any(isinstance(m, AdapterSite) for m in model.modules())
    assert all(b.post_attn_adapter is None and b.self_attn.kv_prefix is None for b in model.transformer.layers)
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in model.parameters()) and peft.handle_of(model) is None
    assert torch.equal(model(x).logits, base(x).logits)


def test_slot_combine_rules():
    x = torch.randn(2, 3, 4)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    for combine, expected in (("serial", b(a(x))), ("parallel", a(x) + b(x))):
        slot = AdapterSlot(combine)
        slot.adapters.update({"a": a, "b": b})
        slot.set_active(["a", "b"])
        assert torch.allclose(slot(x), expected)
        slot.disabled = True
        assert slot(x) is (x if combine == "serial" else None)
    prefix = AdapterSlot("prefix")
    prefix.adapters.update({"p": Prefix(2, 3, 5), "q": Prefix(2, 1, 5)})
    prefix.set_active(["p", "q"])
    k, v = prefix(torch.zeros(4, 6, 8))
    assert k.shape == v.shape == (4, 2, 4, 5)


def test_a_slot_set_by_hand_is_not_taken_over():
    model = tiny()
    model.transformer.layers[0].post_attn_adapter = nn.Identity()
    with pytest.raises(PeftError, match="set by hand"):
        peft.apply(model, "test_bottleneck")
    assert peft.handle_of(model) is None and model.transformer.layers[1].post_attn_adapter is None
