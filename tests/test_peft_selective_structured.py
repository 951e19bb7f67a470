"""Diff pruning (the hard-concrete's expected L0 in closed form, pruning to the exact density,
structured gates, pruning through the Trainer), FAR (whole FFN nodes by L1 norm), cross-attention
tuning (BART only), SPT (sensitivity |g·θ|, LoRA for dense-sensitive matrices, the budget filled
exactly), and the optimizer-state memory of a 0.5% selection against full fine-tuning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llmkit.peft as peft
from llmkit.peft import PeftError
from llmkit.peft.diff_pruning import DiffPruningConfig, HardConcreteDelta, prune
from test_peft_selective_data import batches, lm_loss, model_for


def seq2seq_loss(model, batch):
    src, tgt = batch
    logits = model(src, decoder_input_ids=tgt[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1))


def train(model, loss_fn, data, steps=20, wrap=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    inner = loss_fn
    loss_fn = wrap(lambda m, b: (inner(m, b), {})) if wrap else loss_fn
    model.train()
    for step in range(steps):
        out = loss_fn(model, data[step % len(data)])
        (out[0] if isinstance(out, tuple) else out).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def changed_entries(handle, before):
    """Flat indices, per wrapped layer, where the effective weight differs from the base."""
    handle.merge()
    out = {}
    for name, layer in handle.layers():
        w = layer.base_layer.weight.reshape(-1)
        out[name] = (w != before[name + ".weight"].reshape(-1)).nonzero().squeeze(1)
    handle.unmerge()
    return out


# ---- diff pruning -------------------------------------------------------------------------------

def test_hard_concrete_expected_l0_equals_its_closed_form():
    config = DiffPruningConfig(density=0.1, stretch=(-0.1, 1.1), beta=2 / 3)
    gate = HardConcreteDelta((6, 5), config)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 30))
    closed = torch.sigmoid(gate.log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    assert torch.allclose(gate.expected_l0(), closed.sum())
    gate.train()
    samples = torch.stack([gate.gate() for _ in range(20000)])
    nonzero = (samples > 0).float().mean(0)
    assert (nonzero - closed).abs().max() < 0.015                 # Monte Carlo P(z ≠ 0) per gate
    # a hand value: log α = 0 with a symmetric stretch gives P = σ(0 − β·log 1) = 1/2
    half = HardConcreteDelta((4, 4), DiffPruningConfig(density=0.5, log_alpha_init=0.0))
    assert half.expected_l0().item() == 8.0
    row = HardConcreteDelta((4, 8), DiffPruningConfig(density=0.5, log_alpha_init=0.0, structure="row"))
    assert row.log_alpha.shape == (4,) and row.expected_l0().item() == 16.0
    block = HardConcreteDelta((3, 10), DiffPruningConfig(density=0.5, log_alpha_init=0.0, structure="block",
                                                         block_size=8))
    assert block.log_alpha.shape == (4,) and block.expected_l0().item() == 15.0     # 8+8+8+6 entries


@pytest.mark.parametrize("structure", ["entry", "row"])
def test_diff_pruning_prunes_to_the_exact_density_and_the_pruned_delta_reloads_bitwise(structure, tmp_path):
    model = model_for()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        plain = model(x).logits
    handle = peft.apply(model, "diff_pruning", density=0.02, structure=structure, l0_lambda=1e-4)
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain)                # w = 0: identity at init
    assert handle.trainable_parameters().count == handle.expected_trainable()
    penalty = peft.get_method("diff_pruning").penalty(handle)
    assert penalty is not None and penalty > 0
    train(model, lm_loss, batches(), steps=10, wrap=handle.wrap_loss)
    sites = [a for _, _, a in handle.adapter_modules()]
    magnitudes = torch.cat([a.eval().delta().detach().abs() for a in sites])
    total = sum(a.numel for a in sites)
    k = prune(handle)
    assert k == int(0.02 * total) == handle.trainable_parameters().count == handle.expected_trainable()
    assert handle.adapters["default"].config.pruned
    kept = torch.cat([a.values.detach().abs() for _, _, a in handle.adapter_modules()])
    assert kept.numel() == k and kept.min() >= magnitudes.sort(descending=True).values[k - 1]
    changed = changed_entries(handle, {n.replace(".base_layer", ""): p for n, p in before.items()})
    assert sum(c.numel() for c in changed.values()) <= k          # delta density at most the target
    with torch.no_grad():
        tuned = model(x).logits
    handle.save(tmp_path)
    fresh = model_for()
    peft.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, tuned)


def test_diff_pruning_prunes_inside_the_trainer_and_keeps_training_the_kept_entries(tmp_path):
    from llmkit.train import TrainConfig, Trainer
    model = model_for()
    handle = peft.apply(model, "diff_pruning", count=400, prune_at=3, targets=["up_proj", "down_proj"])
    data = iter(batches(50, seed=4))
    trainer = Trainer(model, handle.wrap_loss(lambda m, b: (lm_loss(m, b), {})), data,
                      config=TrainConfig(max_steps=6, lr=1e-2, weight_decay=0.01, out_dir=str(tmp_path),
                                         progress=False, tensorboard=False, plot=False),
                      callbacks=handle.callbacks())
    values = None

    class Watch:
        def on_step_end(self, trainer, step, metrics):
            nonlocal values
            if step == 3:
                values = torch.cat([a.values.detach().clone() for _, _, a in handle.adapter_modules()])
    trainer.callbacks.append(Watch())
    trainer.fit()
    assert handle.trainable_parameters().count == 400
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in opt_params) == 400              # w and log α left the optimizer
    after = torch.cat([a.values.detach() for _, _, a in handle.adapter_modules()])
    assert not torch.equal(after, values)                          # the kept entries trained on


# ---- FAR ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["bert-tiny", "llama-tiny"])
def test_far_trains_whole_ffn_nodes_ranked_by_l1(preset):
    model = model_for(preset)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = peft.apply(model, "far", density=0.25)
    d_ff, d = model.config.d_ff, model.config.d_model
    projections = 3 if preset == "llama-tiny" else 2
    n = d_ff // 4
    assert handle.trainable_parameters().count == model.config.n_layers * n * d * projections \
        == handle.expected_trainable()
    train(model, lm_loss, batches(), steps=5)
    changed = changed_entries(handle, {n.replace(".base_layer", ""): p for n, p in before.items()})
    for i in range(model.config.n_layers):
        ffn = next(m for name, m in model.named_modules() if name.endswith(f"layers.{i}.mlp"))
        score = ffn.down_proj.weight.abs().sum(0) + ffn.up_proj.weight.abs().sum(1)
        if preset == "llama-tiny":
            score = score + ffn.gate_proj.weight.abs().sum(1)
        top = set(torch.topk(score, n).indices.tolist())
        for name, idx in changed.items():
            if f"layers.{i}.mlp." not in name:
                continue
            width = d
            nodes = (idx // width) if not name.endswith("down_proj") else (idx % d_ff)
            assert set(nodes.tolist()) <= top, name                    # only the kept nodes moved
            assert idx.numel() > 0


def test_far_rejects_a_target_that_is_not_an_ffn_projection():
    with pytest.raises(PeftError, match="far: 'transformer.layers.0.self_attn.q_proj' is not a feed-forward"):
        peft.apply(model_for("bert-tiny"), "far", density=0.5, targets=["q_proj"])


# ---- cross-attention tuning ---------------------------------------------------------------------

def test_xattn_trains_bart_cross_attention_only_and_errors_without_it():
    model = model_for("bart-tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = peft.apply(model, "xattn")
    cross = [m for name, m in model.named_modules() if ".cross_attn." in name and isinstance(m, torch.nn.Linear)]
    expected = sum(p.numel() for m in cross for p in m.parameters())
    assert expected > 0 and handle.trainable_parameters().count == expected == handle.expected_trainable()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(4, 512, (2, 9), generator=g), torch.randint(4, 512, (2, 7), generator=g))
            for _ in range(3)]
    train(model, seq2seq_loss, data, steps=5)
    handle.merge()
    for name, p in model.named_parameters():
        if ".adapters." in name:
            continue
        original = before[name.replace(".base_layer", "")]
        if ".cross_attn." in name:
            assert not torch.equal(p, original), name
        else:
            assert torch.equal(p, original), name                   # everything else bitwise θ₀
    handle.unmerge()
    for preset in ("gpt2-tiny", "bert-tiny"):
        with pytest.raises(PeftError, match="xattn: the model has no cross-attention"):
            peft.apply(model_for(preset), "xattn")


# ---- SPT ----------------------------------------------------------------------------------------

def test_spt_fills_the_budget_exactly_with_lora_where_sensitivity_is_dense(tmp_path):
    from llmkit.peft.fisher import scores
    from llmkit.peft.lora import LoraAdapter
    from llmkit.peft.selective import SparseDelta
    model = model_for()
    data = batches()
    weights = [m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not name.endswith("lm_head")]
    sensitivity = scores(model, weights, data, lm_loss, num_batches=3, kind="sensitivity", per_example=False)
    # by hand: Σ_b |g_b ⊙ θ| for the first matrix
    w0 = weights[0]
    w0.requires_grad_(True)
    hand = sum((torch.autograd.grad(lm_loss(model, b), w0)[0] * w0).abs() for b in data)
    w0.requires_grad_(False)
    torch.testing.assert_close(sensitivity[0], hand.detach())
    handle = peft.apply(model, "spt", count=6000, lora_threshold=0.05, batches=data, loss_fn=lm_loss)
    kinds = [type(a) for _, _, a in handle.adapter_modules()]
    assert LoraAdapter in kinds and SparseDelta in kinds
    assert handle.trainable_parameters().count == 6000 == handle.expected_trainable()
    x = batches(1, seed=8)[0]
    with torch.no_grad():
        base = model(x).logits
    with torch.no_grad():
        for _, _, a in handle.adapter_modules():
            for p in a.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        tuned = model(x).logits
    assert not torch.equal(tuned, base)
    handle.save(tmp_path)
    fresh = model_for()
    peft.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, tuned)
        assert (peft.handle_of(fresh).merge_and_unload()(x).logits - tuned).abs().max() < 1e-5


# ---- memory -------------------------------------------------------------------------------------

def test_optimizer_state_at_half_a_percent_is_under_two_percent_of_full_fine_tuning():
    def state_bytes(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
        train(model, lm_loss, batches(1), steps=1)
        loss = lm_loss(model.train(), batches(1)[0])
        loss.backward()
        opt.step()
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)
    full = state_bytes(model_for())
    model = model_for()
    peft.apply(model, "fishmask", density=0.005, batches=batches(), loss_fn=lm_loss)
    sparse = state_bytes(model)
    assert sparse / full <= 0.02, (sparse, full)
