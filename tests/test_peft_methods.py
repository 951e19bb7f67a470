"""Method-specific properties: DyLoRA rank truncation and sampling, AdaLoRA budget schedule,
importance, regulariser and pruning through the Trainer, LoRA-FA's custom backward and memory."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import llmkit
import llmkit.peft as peft
from llmkit.peft.adalora_budget import budget_at, orthogonality, update_importance
from llmkit.peft.lora_fa import _FrozenAProjection
from llmkit.train import TrainConfig, Trainer


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2))


def clm_loss(model, batch):
    logits = model(batch["input_ids"]).logits[:, :-1]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))
    return loss, {}


def batches(n=4):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 512, (2, 12), generator=g)} for _ in range(n)]


def train_config(tmp_path, steps, **kw):
    return TrainConfig(out_dir=tmp_path, max_steps=steps, lr=1e-2, tensorboard=False, progress=False, plot=False,
                       log_every=1, **kw)


# ---- DyLoRA ------------------------------------------------------------------------------------

def test_dylora_truncation_to_every_rank_matches_the_formula():
    model = net()
    x = torch.randn(5, 8)
    h = peft.apply(model, "dylora", r=4, alpha=6, targets=["0", "2"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, a in h.adapter_modules():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
    model.eval()
    for b in range(1, 5):
        peft.set_rank(h, b)
        layer = model[0]
        ad = layer.adapters["default"]
        expected = layer.base_layer(x) + (6 / b) * x @ ad.lora_A[:b].t() @ ad.lora_B[:, :b].t()
        assert torch.allclose(layer(x), expected, atol=1e-6)
        out = model(x)
        h.merge()
        assert (model(x) - out).abs().max().item() <= 1e-5
        h.unmerge()


def test_dylora_samples_a_rank_each_step_through_the_trainer(tmp_path):
    model = llmkit.build_model(llmkit.get_preset("llama-tiny"))
    h = peft.apply(model, "dylora", r=4, targets=["q_proj", "v_proj"])
    assert any(type(c).__name__ == "RankSampling" for c in h.callbacks())
    seen = []

    class Spy:
        def on_after_backward(self, trainer, step):
            seen.append(h.adapters["default"].config.state.train)
    Trainer(model, clm_loss, batches(), config=train_config(tmp_path, 12), callbacks=h.callbacks() + [Spy()]).fit()
    assert all(1 <= b <= 4 for b in seen) and len(set(seen)) > 1
    assert h.adapters["default"].config.state.train is None          # inference uses the eval rank


def test_dylora_freeze_lower_trains_only_the_sampled_row():
    model = net()
    h = peft.apply(model, "dylora", r=4, freeze_lower=True, targets=["0"])
    h.adapters["default"].config.state.train = 3
    model.train()
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_()
    model(torch.randn(5, 8)).sum().backward()
    rows = ad.lora_A.grad.abs().sum(1)
    assert rows[2] > 0 and torch.all(rows[[0, 1, 3]] == 0)


# ---- AdaLoRA -----------------------------------------------------------------------------------

def test_adalora_budget_schedule_worked_example():
    """b0 = 96, b_T = 48, t_i = 10, t_f = 20, T = 100 (Zhang et al. 2023, eq. 12)."""
    b = lambda t: budget_at(t, 96, 48, 10, 20, 100)
    assert b(0) == b(9) == b(10) == 96
    # t = 45: 48 + 48 (1 - 35/70)^3 = 48 + 6 = 54
    assert b(45) == 54
    # t = 40: 48 + 48 (4/7)^3 = 56.96 -> 56
    assert b(40) == 56
    assert b(80) == b(100) == 48
    assert all(b(t) >= b(t + 1) for t in range(100))


def test_adalora_importance_is_smoothed_sensitivity_times_uncertainty():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    w.grad = torch.tensor([0.5, 0.5, -4.0])
    ibar, ubar = torch.zeros(3), torch.zeros(3)
    update_importance(w, ibar, ubar, beta1=0.8, beta2=0.6)
    sens = torch.tensor([0.5, 1.0, 2.0])                     # |w g|
    assert torch.allclose(ibar, 0.2 * sens)
    assert torch.allclose(ubar, 0.4 * (sens - 0.2 * sens).abs())


def test_adalora_regulariser_is_zero_for_orthonormal_factors():
    P, _ = torch.linalg.qr(torch.randn(16, 4))               # orthonormal columns
    Q, _ = torch.linalg.qr(torch.randn(10, 4))
    assert orthogonality(P, Q.t()).item() == pytest.approx(0.0, abs=1e-10)
    assert orthogonality(torch.randn(16, 4), torch.randn(4, 10)).item() > 1.0
    model = net()
    h = peft.apply(model, "adalora", r=4, targets=["0", "2"])
    with torch.no_grad():
        for _, _, a in h.adapter_modules():
            a.lora_B.copy_(torch.linalg.qr(torch.randn(a.lora_B.shape))[0])
            a.lora_A.copy_(torch.linalg.qr(torch.randn(a.lora_A.shape[1], a.r))[0].t())
    assert peft.orthogonality_penalty(h).item() == pytest.approx(0.0, abs=1e-9)


def test_adalora_budget_falls_to_target_and_is_logged(tmp_path):
    model = llmkit.build_model(llmkit.get_preset("llama-tiny"))
    h = peft.apply(model, "adalora", r=4, target_r=2, t_init=2, t_final=3, targets=["q_proj", "v_proj"])
    n = 4                                                     # 2 blocks x (q, v)
    result = Trainer(model, clm_loss, batches(), config=train_config(tmp_path, 12), callbacks=h.callbacks()).fit()
    callback = next(c for c in h.callbacks() if type(c).__name__ == "BudgetCallback")
    kept = [k for _, k in callback.history]
    assert kept[0] == 4 * n and kept[-1] == 2 * n
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    assert result.metrics["rank_budget"] == 2 * n
    masks = [a.rank_mask for _, _, a in h.adapter_modules()]
    assert sum(int(m.sum()) for m in masks) == 2 * n
    for _, _, a in h.adapter_modules():                       # pruned singular values are zero
        assert torch.all(a.lora_E[~a.rank_mask] == 0)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [l["rank_budget"] for l in lines if l["split"] == "train"]
    assert logged[0] == 4 * n and logged[-1] == 2 * n


def test_adalora_penalty_is_part_of_the_trainers_loss(tmp_path):
    """handle.wrap_loss adds γ Σ (||P^T P - I||² + ||Q Q^T - I||²): the wrapped loss and the Trainer's
    logged loss are the task loss + that penalty computed by hand, and its gradient reaches P and Q
    (at init Λ = 0, so the task loss alone gives them none)."""
    torch.manual_seed(0)
    model = llmkit.build_model(llmkit.get_preset("llama-tiny"))
    h = peft.apply(model, "adalora", r=4, orth_reg=0.3, targets=["q_proj", "v_proj"])
    batch, adapters, eye = batches(1)[0], [a for _, _, a in h.adapter_modules()], torch.eye(4)
    by_hand = 0.3 * sum(((a.lora_B.t() @ a.lora_B - eye) ** 2).sum() + ((a.lora_A @ a.lora_A.t() - eye) ** 2).sum()
                        for a in adapters)
    factors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    expected_grads = torch.autograd.grad(by_hand, factors)
    task = clm_loss(model, batch)[0].item()
    loss, metrics = h.wrap_loss(clm_loss)(model, batch)
    assert loss.item() == pytest.approx(task + by_hand.item(), rel=1e-6)
    assert metrics["penalty/adalora"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert all(torch.allclose(t.grad, g, atol=1e-6) and g.abs().sum() > 0 for t, g in zip(factors, expected_grads))
    model.zero_grad()
    Trainer(model, h.wrap_loss(clm_loss), [batch], config=train_config(tmp_path, 1), callbacks=h.callbacks()).fit()
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["loss"] == pytest.approx(task + by_hand.item(), rel=1e-6)
    assert logged["penalty/adalora"] == pytest.approx(by_hand.item(), rel=1e-6)


# ---- LoRA-FA -----------------------------------------------------------------------------------

def test_lora_fa_backward_matches_autograd_and_freezes_a():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    A = torch.randn(4, 8)
    B = torch.randn(6, 4, requires_grad=True)
    y = _FrozenAProjection.apply(x, A, B, 0.5)
    g = torch.randn_like(y)
    gx, gB = torch.autograd.grad(y, (x, B), g)
    x2, B2 = x.detach().requires_grad_(), B.detach().requires_grad_()
    y2 = 0.5 * (x2 @ A.t()) @ B2.t()
    rx, rB = torch.autograd.grad(y2, (x2, B2), g)
    assert torch.allclose(y, y2, atol=1e-6) and torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gB, rB, atol=1e-5)
    model = net()
    h = peft.apply(model, "lora_fa", r=2, targets=["0"])
    assert "lora_A" in dict(model[0].adapters["default"].named_buffers())
    assert h.trainable_parameters().count == 2 * 12


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward during fn()."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_lora_fa_keeps_only_the_rank_r_activation():
    x = torch.randn(4, 64, 256)                               # (B, T, in): N = 256 tokens
    layer_sizes = (256, 256)
    results = {}
    for method in ("lora", "lora_fa"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(*layer_sizes))
        peft.apply(model, method, r=4, targets=["0"])
        results[method] = saved_bytes(lambda: model(x))
    # LoRA keeps x (N x in) for dA; LoRA-FA keeps z = A x (N x r) plus the parameters it holds anyway
    n = x.numel() // x.shape[-1]
    assert results["lora"] - results["lora_fa"] >= (n * 256 - n * 4) * 4 - 4 * 256 * 4 * 2


def test_adalora_resume_prunes_exactly_like_an_uninterrupted_run(tmp_path):
    """The importance averages live in the model's state dict, so a run stopped at step 5 and
    resumed from its checkpoint ends with the same masks and weights as a straight 12-step run;
    adapter files still leave them out."""
    from dist_worker import StopAt, TokenBatches

    def run(out, stop_at=None, resume=False):
        torch.manual_seed(0)
        model = llmkit.build_model(llmkit.get_preset("llama-tiny"))
        h = peft.apply(model, "adalora", r=4, target_r=2, t_init=2, t_final=3, delta_t=1, total_steps=12,
                       targets=["q_proj", "v_proj"])
        Trainer(model, h.wrap_loss(clm_loss), TokenBatches(batch_size=2, seq_len=12),
                config=train_config(out, 12, resume=resume),
                callbacks=h.callbacks() + ([StopAt(stop_at)] if stop_at else [])).fit()     # a seekable loader: resumable
        return h

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=5)
    resumed = run(tmp_path / "b", resume=True)
    for (_, _, a), (_, _, b) in zip(straight.adapter_modules(), resumed.adapter_modules()):
        assert torch.equal(a.rank_mask, b.rank_mask) and torch.equal(a.ibar_E, b.ibar_E)
        assert torch.equal(a.lora_E, b.lora_E) and torch.equal(a.lora_A, b.lora_A)
    straight.save(tmp_path / "adapter")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and not any(".ibar_" in k or ".ubar_" in k for k in saved)
    fresh = llmkit.build_model(llmkit.get_preset("llama-tiny"))
    peft.load_adapter(fresh, tmp_path / "adapter")       # loads without the training-only buffers
