"""Selective methods that choose from data: FishMask's Fisher equals an explicit per-example loop,
exact counts, the mask holds under AdamW with weight decay, Fish-DiP re-selects without losing what
left the mask (and its optimizer state follows the entries), Child-tuning_F and _D (keep rate
within 5σ of p_D, kept gradients scaled by 1/p_D), bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmkit
import llmkit.peft as peft
from llmkit.peft import PeftError
from llmkit.peft.fishmask import reselect
from llmkit.peft.selective import SparseDelta


def model_for(preset="gpt2-tiny"):
    torch.manual_seed(0)
    return llmkit.build_model(llmkit.get_preset(preset)).eval()


def lm_loss(model, batch):
    logits = model(batch).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def batches(n=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (b, 10), generator=g) for _ in range(n)]


def test_fishmask_fisher_equals_an_explicit_per_example_loop_and_picks_the_top_k():
    model = model_for()
    data = batches()
    handle = peft.apply(model, "fishmask", count=500, targets=["up_proj"], batches=data, loss_fn=lm_loss,
                        num_batches=3)
    layers = [m for _, m in handle.layers()]
    weights = [m.base_layer.weight for m in layers]
    # the explicit loop: one example at a time, Σ g²
    fisher = [torch.zeros_like(w) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    for batch in data:
        for i in range(batch.shape[0]):
            grads = torch.autograd.grad(lm_loss(model, batch[i:i + 1]), weights)
            for f, g in zip(fisher, grads):
                f += g.square()
    for w in weights:
        w.requires_grad_(False)
    from llmkit.peft.fisher import scores
    computed = scores(model, weights, data, lm_loss, num_batches=3)
    for f, c in zip(fisher, computed):
        torch.testing.assert_close(c, f, rtol=1e-5, atol=1e-12)
    assert handle.trainable_parameters().count == 500 == handle.expected_trainable()
    chosen = torch.cat([f.reshape(-1)[m.adapters["default"].index] for f, m in zip(fisher, layers)])
    threshold = torch.cat([f.reshape(-1) for f in fisher]).sort(descending=True).values[499]
    assert chosen.numel() == 500 and chosen.min() >= threshold * (1 - 1e-5)
    assert not any(w.requires_grad for w in weights)          # requires_grad left as apply set it


@pytest.mark.parametrize("method,options", [("fishmask", {}), ("fish_dip", {"update_every": 5}),
                                            ("child_tuning", {"mode": "F"})])
def test_the_mask_holds_under_adamw_with_weight_decay_in_a_plain_loop(method, options):
    model = model_for()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = peft.apply(model, method, density=0.01, batches=batches(), loss_fn=lm_loss, **options)
    count = handle.trainable_parameters().count
    total = sum(m.base_layer.weight.numel() for _, m in handle.layers())
    assert count == int(0.01 * total) == handle.expected_trainable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    model.train()
    for step, x in enumerate(batches(20, seed=5)):
        lm_loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert sum(t.numel() for s in opt.state.values() for k, t in s.items() if k == "exp_avg") == count
    for _, layer in handle.layers():
        delta = layer.adapters["default"]
        effective = delta.patched(layer.base_layer.weight).reshape(-1)
        base = layer.base_layer.weight.reshape(-1)
        outside = torch.ones_like(base, dtype=torch.bool)
        outside[delta.index] = False
        assert torch.equal(effective[outside], base[outside])      # bitwise θ₀ outside the mask
    for name, p in model.named_parameters():
        if "base_layer" in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")])


def test_fish_dip_reselects_keeps_what_left_and_moves_optimizer_state():
    delta = SparseDelta("weight", (4, 5), torch.tensor([1, 3, 7, 12]))
    with torch.no_grad():
        delta.values.copy_(torch.tensor([10., 30., 70., 120.]))
    opt = torch.optim.AdamW([delta.values], lr=0.1)
    delta.values.grad = torch.ones(4)
    opt.step()
    m_before = opt.state[delta.values]["exp_avg"].clone()
    base = torch.zeros(4, 5)
    effective = delta.patched(base).clone()
    changed = reselect(delta, torch.tensor([3, 5, 12, 19]), opt)
    assert changed == 2
    assert delta.index.tolist() == [3, 5, 12, 19]
    assert delta.values.tolist() == [opt.param_groups[0]["params"][0][0].item(), 0.0,
                                     delta.values[2].item(), 0.0]
    assert delta.settled_index.tolist() == [1, 7]                  # what left keeps its value
    assert torch.equal(delta.patched(base), effective)             # the model is unchanged by re-selection
    m = opt.state[delta.values]["exp_avg"]
    assert m[0] == m_before[1] and m[2] == m_before[3] and m[1] == 0 and m[3] == 0
    reselect(delta, torch.tensor([1, 3, 5, 12]), opt)              # a settled entry comes back
    assert torch.equal(delta.patched(base), effective)
    assert delta.settled_index.tolist() == [7]


def test_fish_dip_callback_reselects_through_the_trainer(tmp_path):
    from llmkit.train import TrainConfig, Trainer
    model = model_for()
    handle = peft.apply(model, "fish_dip", count=300, update_every=3, top_examples=4, targets=["up_proj"],
                        batches=batches(4, seed=9), loss_fn=lm_loss, num_batches=2)
    data = iter(batches(100, seed=3))
    trainer = Trainer(model, handle.wrap_loss(lambda m, b: (lm_loss(m, b), {})), data,
                      config=TrainConfig(max_steps=6, lr=1e-2, out_dir=str(tmp_path / "run"), progress=False,
                                         log_every=1, tensorboard=False, plot=False),
                      callbacks=handle.callbacks())
    x = batches(1, seed=77)[0]
    trainer.fit()
    import json
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    changes = [r["mask_changed"] for r in rows if "mask_changed" in r]
    assert len(changes) == 2 and all(0 <= c <= 1 for c in changes)      # at steps 3 and 6
    assert handle.trainable_parameters().count == 300
    with torch.no_grad():
        tuned = model(x).logits
    handle.save(tmp_path / "adapter")
    fresh = model_for()
    peft.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, tuned)                 # settled entries are saved too


def test_child_tuning_d_keep_rate_is_within_5_sigma_and_kept_gradients_are_scaled():
    model = model_for()
    p = 0.3
    handle = peft.apply(model, "child_tuning", mode="D", p_d=p, targets=["up_proj"])
    layers = [m for _, m in handle.layers()]
    assert handle.trainable_parameters().count == sum(m.base_layer.weight.numel() for m in layers)
    x = batches(1)[0]
    # the raw gradient of the effective weight: the base weight's, with the adapters off
    weights = [m.base_layer.weight for m in layers]
    for w in weights:
        w.requires_grad_(True)
    with handle.disable():
        raw = torch.autograd.grad(lm_loss(model, x), weights)
    for w in weights:
        w.requires_grad_(False)
    torch.manual_seed(123)
    lm_loss(model, x).backward()
    kept = n = 0
    for layer, g in zip(layers, raw):
        masked = layer.adapters["default"].values.grad
        g = g.reshape(-1)
        nonzero = g != 0
        keep = masked[nonzero] != 0
        kept += int(keep.sum())
        n += int(nonzero.sum())
        torch.testing.assert_close(masked[nonzero][keep], g[nonzero][keep] / p)   # scaled by 1/p_D
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept / n - p) < 5 * sigma, (kept / n, p, sigma)


def test_data_methods_reject_bad_input():
    model = model_for()
    with pytest.raises(PeftError, match="batches= yielded 0 batches"):
        peft.apply(model, "fishmask", density=0.01, batches=[], loss_fn=lm_loss)
    with pytest.raises(PeftError, match="pass batches="):
        peft.apply(model, "fishmask", density=0.01)
    with pytest.raises(PeftError, match=r"num_batches=0: expected a positive"):
        peft.apply(model, "fishmask", density=0.01, batches=batches(), loss_fn=lm_loss, num_batches=0)
    with pytest.raises(PeftError, match=r"density=1.5: expected a fraction in \(0, 1\]"):
        peft.apply(model, "fish_dip", density=1.5, batches=batches(), loss_fn=lm_loss)
    with pytest.raises(PeftError, match=r"p_d=0: expected a keep probability"):
        peft.apply(model, "child_tuning", mode="D", p_d=0)
    with pytest.raises(PeftError, match=r"mode='X'"):
        peft.apply(model, "child_tuning", mode="X")


class Stream:
    """A list of batches as a resumable Trainer stream (its position is checkpointed)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.items[(self.i - 1) % len(self.items)]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_fish_dip_resumes_from_a_trainer_checkpoint_like_an_uninterrupted_run(tmp_path):
    from llmkit.train import TrainConfig, Trainer

    def run(out, steps, resume=False):
        model = model_for()
        handle = peft.apply(model, "fish_dip", count=200, update_every=2, targets=["up_proj"],
                            batches=batches(2, seed=9), loss_fn=lm_loss, num_batches=2)
        config = TrainConfig(max_steps=steps, lr=1e-2, out_dir=str(out), progress=False, tensorboard=False,
                             plot=False, save_every=3, resume=resume, schedule="constant", warmup_steps=0)
        Trainer(model, handle.wrap_loss(lambda m, b: (lm_loss(m, b), {})), Stream(batches(20, seed=3)),
                config=config, callbacks=handle.callbacks()).fit()
        return model, handle

    straight, _ = run(tmp_path / "a", 5)
    run(tmp_path / "b", 3)                                  # stops at step 3 with settled entries saved
    resumed, handle = run(tmp_path / "b", 5, resume=True)
    assert any(getattr(a, "settled_index", None) is not None and a.settled_index.numel()
               for _, _, a in handle.adapter_modules())
    x = batches(1, seed=77)[0]
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, straight(x).logits)
