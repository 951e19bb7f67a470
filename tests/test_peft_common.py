"""Properties every registered PEFT method must have (the generic suite, like HF peft's common tests).

Each test runs for every method in llmkit.peft.METHODS on a tiny llmkit model and, where it
matters, on a plain torch module.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import llmkit
import llmkit.peft as peft
from llmkit.io.errors import CheckpointError
from llmkit.peft import PeftError
from llmkit.peft.layers import AdaptedLayer

# The low-rank layer methods (tests/test_peft_additive.py runs the same properties for the additive ones).
METHODS = sorted(m for m, spec in peft.METHODS.items() if issubclass(spec.config_class, peft.LowRankConfig))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def closed_form(method: str, n_in: int, n_out: int, r: int) -> int:
    """Trainable parameters of one adapted Linear, from each paper's parameterisation."""
    return {"lora": r * (n_in + n_out),            # A (r, in), B (out, r)
            "dylora": r * (n_in + n_out),          # the same factors, truncated per step
            "adalora": r * (n_in + n_out + 1),     # P, Q and the r singular values Λ
            "lora_fa": r * n_out}[method]          # B only; A frozen


def tiny(preset="llama-tiny", **kw):
    torch.manual_seed(0)
    return llmkit.build_model(llmkit.get_preset(preset, **kw)).eval()


def ids(batch=2, length=8, vocab=512):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def randomize(handle, scale=0.05):
    """Non-zero adapter weights (B is zero at init), AdaLoRA's Λ included."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, adapter in handle.adapter_modules():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
    model = tiny()
    x = ids()
    base = model(x).logits
    handle = peft.apply(model, method, r=4, alpha=8, targets=TARGETS)
    assert any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert (model(x).logits - base).abs().max().item() <= 1e-6
    handle.merge()
    assert (model(x).logits - base).abs().max().item() <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged_and_unmerge_restores(method):
    model = tiny()
    x = ids()
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = peft.apply(model, method, r=4, alpha=8, targets=TARGETS)
    randomize(handle)
    base_out = tiny()(x).logits
    unmerged = model(x).logits
    assert (unmerged - base_out).abs().max().item() > 1e-3      # the adapters do something
    handle.merge()
    merged = model(x).logits
    assert (merged - unmerged).abs().max().item() <= 1e-4
    handle.unmerge()
    for name, layer in handle.layers():
        w0 = weights0[f"{name}.weight"]
        assert (layer.base_layer.weight - w0).abs().max().item() <= 1e-6
    assert (model(x).logits - unmerged).abs().max().item() <= 1e-5
    plain = copy.deepcopy(model)
    h2 = peft.handle_of(plain)
    out_model = h2.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in out_model.modules())
    assert set(dict(out_model.named_parameters())) == set(weights0)          # the plain layout back
    assert (out_model(x).logits - unmerged).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_matches_closed_form(method):
    model = tiny()
    r = 3
    handle = peft.apply(model, method, r=r, targets=TARGETS)
    expected = 0
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            base = module.base_layer
            expected += closed_form(method, base.in_features, base.out_features, r)
    count, percent = handle.trainable_parameters()
    assert count == expected == handle.expected_trainable()
    total = sum(p.numel() for p in model.parameters())
    assert percent == pytest.approx(100 * expected / total)
    # everything outside the adapters is frozen
    for name, p in model.named_parameters():
        assert p.requires_grad == (".adapters." in name), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt", ["llmkit", "peft"])
def test_save_load_round_trip(method, fmt, tmp_path):
    model = tiny()
    x = ids()
    handle = peft.apply(model, method, r=4, alpha=8, targets=TARGETS)
    randomize(handle)
    expected = model(x).logits
    handle.save(tmp_path, format=fmt)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    fresh = tiny()
    loaded = peft.load(fresh, tmp_path)
    assert (fresh(x).logits - expected).abs().max().item() <= (0 if fmt == "llmkit" else 1e-5)
    if fmt == "llmkit":
        assert loaded.adapters["default"].method == method


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_only_adapters(method):
    model = tiny()
    handle = peft.apply(model, method, r=4, targets=TARGETS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        loss = model(ids()).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters." in n for n in changed)
    assert handle.trainable_parameters().count > 0


@pytest.mark.parametrize("method", METHODS)
def test_disable_runs_the_base_model(method):
    model = tiny()
    x = ids()
    base_out = model(x).logits
    handle = peft.apply(model, method, r=4, targets=TARGETS)
    randomize(handle)
    adapted = model(x).logits
    with handle.disable():
        assert (model(x).logits - base_out).abs().max().item() <= 1e-6
    assert torch.equal(model(x).logits, adapted)
    handle.merge()
    with handle.disable():                       # merged adapters are taken out for the duration
        assert (model(x).logits - base_out).abs().max().item() <= 1e-5
    assert (model(x).logits - adapted).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_plain_torch_module(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 6)
    base = net(x)
    handle = peft.apply(net, method, r=2, targets="all-linear")
    assert [n for n, _ in handle.layers()] == ["0", "2"]        # the output layer is never adapted
    assert (net(x) - base).abs().max().item() <= 1e-6
    randomize(handle)
    unmerged = net(x)
    handle.merge()
    assert (net(x) - unmerged).abs().max().item() <= 1e-4


def test_target_selection_suffix_regex_all_linear_layers():
    model = tiny()
    h = peft.apply(model, "lora", r=2, targets=["q_proj"], layers=[1])
    assert [n for n, _ in h.layers()] == ["transformer.layers.1.self_attn.q_proj"]
    model = tiny()
    h = peft.apply(model, "lora", r=2, targets=r".*layers\.0\.mlp\.(up|down)_proj")
    assert [n for n, _ in h.layers()] == ["transformer.layers.0.mlp.up_proj", "transformer.layers.0.mlp.down_proj"]
    model = tiny()
    h = peft.apply(model, "lora", r=2, targets="all-linear")
    names = [n for n, _ in h.layers()]
    assert len(names) == 2 * 7 and "lm_head" not in names                  # 4 attn + 3 mlp per block


def test_embedding_lora_and_rslora():
    model = tiny(tie_word_embeddings=False)
    x = ids()
    base = model(x).logits
    h = peft.apply(model, "lora", r=4, alpha=8, rslora=True, targets=["embed_tokens", "q_proj"])
    emb = model.transformer.embed_tokens
    assert isinstance(emb, AdaptedLayer) and emb.is_embedding
    assert emb.adapters["default"].scale == pytest.approx(8 / 2)            # alpha / sqrt(r)
    assert (model(x).logits - base).abs().max().item() <= 1e-6
    randomize(h)
    unmerged = model(x).logits
    h.merge()
    assert (model(x).logits - unmerged).abs().max().item() <= 1e-4
    assert h.trainable_parameters().count == 4 * (512 + 64) + 2 * 4 * (64 + 64)


def test_merging_into_a_tied_embedding_is_refused():
    model = tiny("gpt2-tiny")
    h = peft.apply(model, "lora", r=2, targets=["embed_tokens"])
    with pytest.raises(PeftError, match="tied"):
        h.merge()


def test_named_adapters_switch_delete_and_weighted_combination():
    model = tiny()
    x = ids()
    base = model(x).logits
    h = peft.apply(model, "lora", r=2, targets=["q_proj", "v_proj"], adapter_name="a")
    randomize(h)
    peft.apply(model, "lora_fa", r=3, targets=["v_proj"], adapter_name="b")
    assert h.active == ["b"]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, _, ad in h.adapter_modules("b"):
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.05)
    out_b = model(x).logits
    h.set_active("a")
    out_a = model(x).logits
    assert not torch.allclose(out_a, out_b)
    # only the active adapter trains
    assert all(p.requires_grad == (".adapters.a." in n) for n, p in model.named_parameters())
    h.set_active(["a", "b"])
    both = model(x).logits
    # weighted combination is exact: base + 0.5 Δa + 2 Δb
    h.add_weighted_adapter({"a": 0.5, "b": 2.0}, "mix")
    h.set_active("mix")
    mixed = model(x).logits
    h.set_active(["a", "b"])
    with torch.no_grad():
        for _, layer in h.layers():
            for name, ad in layer.adapters.items():
                if name in ("a", "b"):
                    ad.lora_B.mul_({"a": 0.5, "b": 2.0}[name])
    assert (model(x).logits - mixed).abs().max().item() <= 1e-5
    h.delete_adapter("b")
    assert "b" not in h.adapters and all("b" not in l.adapters for _, l in h.layers())
    with h.disable():
        assert (model(x).logits - base).abs().max().item() <= 1e-6
    assert not torch.allclose(both, mixed)


def test_modules_to_save_head_trains_and_disable_uses_the_original():
    torch.manual_seed(0)
    from llmkit.model.models import SequenceClassifier
    model = SequenceClassifier(llmkit.get_preset("bert-tiny"), n_labels=2).eval()
    x = ids()
    base = model(x).logits
    h = peft.apply(model, "lora", r=2, targets=["q_proj", "v_proj"], train_head=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("classifier.copies.default.") for n in trainable)
    assert h.trainable_parameters().count == h.expected_trainable() == 2 * 2 * 2 * (64 + 64) + 64 * 2 + 2
    with torch.no_grad():
        model.classifier.copies["default"].proj.weight.add_(1.0)
    assert not torch.allclose(model(x).logits, base)
    with h.disable():
        assert (model(x).logits - base).abs().max().item() <= 1e-6


def test_trainer_builds_its_optimizer_over_the_adapters_only(tmp_path):
    from llmkit.train import TrainConfig, Trainer
    model = tiny()
    h = peft.apply(model, "lora", r=2, targets=["q_proj"])
    batch = {"input_ids": ids()}

    def loss_fn(m, b):
        return m(b["input_ids"]).logits.logsumexp(-1).mean(), {}
    trainer = Trainer(model, loss_fn, [batch], config=TrainConfig(
        out_dir=tmp_path, max_steps=1, tensorboard=False, progress=False, plot=False))
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in params) == h.trainable_parameters().count


# ---- bad input --------------------------------------------------------------------------------

def test_target_matching_nothing_lists_similar_names():
    with pytest.raises(PeftError, match=r"'q_projj'.*similar module names.*q_proj"):
        peft.apply(tiny(), "lora", targets=["q_projj"])
    with pytest.raises(PeftError, match="query"):
        peft.apply(tiny(), "lora", targets=["query"])        # HF-style name: the error says what exists
    with pytest.raises(PeftError, match="layers"):
        peft.apply(tiny(), "lora", targets=["q_proj"], layers=[7])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_bad_rank(method, r):
    with pytest.raises(PeftError, match="r="):
        peft.apply(tiny(), method, r=r, targets=["q_proj"])


def test_unknown_method_and_option():
    with pytest.raises(PeftError, match="did you mean 'lora'"):
        peft.apply(tiny(), "loraa")
    with pytest.raises(PeftError, match="did you mean 'alpha'"):
        peft.apply(tiny(), "lora", alpah=4)


@pytest.mark.parametrize("fmt", ["llmkit", "peft"])
def test_loading_onto_a_model_of_other_shapes_fails_clearly(fmt, tmp_path):
    model = tiny()
    peft.apply(model, "lora", r=2, targets=["q_proj"]).save(tmp_path, format=fmt)
    other = tiny(d_model=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(CheckpointError, match=r"expected shape .*found .*different layer sizes"):
        peft.load(other, tmp_path)
    assert not any(isinstance(m, AdaptedLayer) for m in other.modules())       # nothing half-attached


@pytest.mark.parametrize("method", ["lora", "dylora", "adalora", "lora_fa"])
def test_half_precision_base_keeps_float32_adapters(method):
    """On a bf16 base the adapter weights stay float32 (upcast_adapters, HF peft's default): the
    output is bf16, identical to the base at init, and the gradients land in float32 weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    base_out = model(x)
    handle = peft.apply(model, method, r=4, targets=["0", "2"])
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base_out)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    model(x).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    kept = peft.apply(nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16), method, r=4, targets=["0"],
                      upcast_adapters=False)
    assert all(p.dtype == torch.bfloat16 for p in kept.model.parameters() if p.requires_grad)
    handle.merge()
    assert handle.model[0].base_layer.weight.dtype == torch.bfloat16
    handle.unmerge()
    # The input cast follows the adapter's own dtype: a later model.to(bf16) still runs.
    assert model.to(torch.bfloat16)(x).dtype == torch.bfloat16
