"""Selective PEFT on a sparse delta: masked entries stay bitwise θ₀ under AdamW with weight decay in
a plain PyTorch loop, exact counts, optimizer state of the selected size, sparse files whose size
follows the count, bitwise reload and merge; BitFit and PaFi."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkit
import llmkit.peft as peft
from llmkit.peft import PeftError


def model_for(preset="bert-tiny"):
    torch.manual_seed(0)
    return llmkit.build_model(llmkit.get_preset(preset)).eval()


def ids(shape=(4, 12), seed=1):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def train_plain(model, steps=20):
    """A plain loop: AdamW (weight decay 0.01) over whatever requires grad, a causal LM loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    model.train()
    for step in range(steps):
        x = ids(seed=step)
        logits = model(x).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def effective_weights(handle):
    """name -> the tensor the model computes with (θ₀ + Δ), from a merge, then unmerged (bitwise)."""
    before = {n: p.detach().clone() for n, p in handle.model.named_parameters() if "base_layer" in n}
    handle.merge()
    out = {n: p.detach().clone() for n, p in handle.model.named_parameters() if "base_layer" in n}
    handle.unmerge()
    for n, p in handle.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n                      # unmerge restores bitwise
    return out


@pytest.mark.parametrize("method,options", [("pafi", {"count": 777}), ("bitfit", {})])
def test_masked_entries_stay_bitwise_under_adamw_with_weight_decay(method, options):
    model = model_for("gpt2-tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = peft.apply(model, method, **options)
    selected = handle.trainable_parameters().count
    if method == "pafi":
        assert selected == 777 == handle.expected_trainable()
    opt = train_plain(model)
    # optimizer state holds the selected entries only
    state = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k == "exp_avg")
    assert state == selected
    after = effective_weights(handle)
    changed = 0
    for name, tensor in after.items():
        original = before[name.replace(".base_layer", "")]
        diff = tensor != original
        changed += int(diff.sum())
        deltas = [a for _, site, a in handle.adapter_modules() if site is model.get_submodule(name.rsplit(".base_layer", 1)[0])]
        allowed = torch.zeros(tensor.numel(), dtype=torch.bool)
        for d in deltas:
            if d.patches == name.rsplit(".", 1)[1]:
                allowed[d.index] = True
        assert not (diff.reshape(-1) & ~allowed).any(), name           # nothing outside the mask moved
    assert 0 < changed <= selected
    # the frozen base tensors themselves were never written
    for name, p in model.named_parameters():
        if "base_layer" in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")])


def test_pafi_picks_the_smallest_magnitudes_globally():
    model = model_for()
    handle = peft.apply(model, "pafi", density=0.01, targets=["q_proj", "v_proj"])
    weights = [m.base_layer.weight for n, m in handle.layers()]
    total = sum(w.numel() for w in weights)
    k = int(0.01 * total)
    assert handle.trainable_parameters().count == k == handle.expected_trainable()
    chosen = torch.cat([m.base_layer.weight.abs().reshape(-1)[m.adapters["default"].index]
                        for _, m in handle.layers()])
    assert chosen.numel() == k
    rest_min = torch.cat([w.abs().reshape(-1) for w in weights]).sort().values[k]
    assert chosen.max() <= rest_min


def test_sparse_file_size_follows_the_count_and_reload_and_merge_are_bitwise(tmp_path):
    sizes = {}
    for k in (100, 2100):
        model = model_for()
        handle = peft.apply(model, "pafi", count=k)
        train_plain(model, steps=3)
        x = ids()
        with torch.no_grad():
            tuned = model(x).logits
        handle.save(tmp_path / str(k))
        sizes[k] = (tmp_path / str(k) / "adapter_model.safetensors").stat().st_size
        fresh = model_for()
        peft.load(fresh, tmp_path / str(k))
        with torch.no_grad():
            assert torch.equal(fresh(x).logits, tuned)
            merged = peft.handle_of(fresh).merge_and_unload()
            assert torch.equal(merged(x).logits, tuned)
    # int64 index + float32 value per entry: 12 bytes each, plus a fixed header
    assert sizes[2100] - sizes[100] == pytest.approx(2000 * 12, rel=0.05)


def test_bitfit_trains_biases_only_and_needs_biases():
    model = model_for()
    handle = peft.apply(model, "bitfit")
    biases = sum(m.bias.numel() for m in model.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None)
    assert handle.trainable_parameters().count == biases == handle.expected_trainable()
    with pytest.raises(PeftError, match=r"bitfit: CausalLM has no site .*add_missing=True"):
        peft.apply(model_for("llama-tiny"), "bitfit")
    llama = model_for("llama-tiny")
    x = ids()
    with torch.no_grad():
        base = llama(x).logits
    h = peft.apply(llama, "bitfit", add_missing=True)
    linears = [m for m in llama.modules() if isinstance(m, torch.nn.Linear)]
    assert h.trainable_parameters().count == sum(m.out_features for m in linears)
    with torch.no_grad():
        assert torch.equal(llama(x).logits, base)                     # zero-initialised
    train_plain(llama, steps=2)
    with torch.no_grad():
        tuned = llama(x).logits
        merged = h.merge_and_unload()                                  # the biases appear on merge
        assert (merged(x).logits - tuned).abs().max() < 1e-5
    assert all(m.bias is not None for m in merged.modules() if isinstance(m, torch.nn.Linear))


def test_selection_options_are_checked():
    for bad, match in (({}, "give exactly one"), ({"density": 0.0}, r"density=0.0: expected a fraction"),
                       ({"count": -1}, r"count=-1: expected a positive integer"),
                       ({"count": 10 ** 9}, "hold only")):
        with pytest.raises(PeftError, match=match):
            peft.apply(model_for(), "pafi", **bad)
