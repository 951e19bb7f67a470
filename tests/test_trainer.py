"""The training loop: schedules, optimizer groups, accumulation, clipping, precision, callbacks, clm."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_worker import LossRecorder, StopAt, TokenBatches, quiet_config, tiny_model
from llmkit.config import ConfigError
from llmkit.objectives import clm_loss
from llmkit.train import TrainConfig, Trainer, build_optimizer, build_scheduler, lr_at
from llmkit.train.logging import read_metrics


# ---- schedules -------------------------------------------------------------------------------
def test_lr_at_follows_the_formulas(tmp_path):
    base = dict(out_dir=tmp_path, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    cosine, linear = TrainConfig(**base, schedule="cosine"), TrainConfig(**base, schedule="linear")
    constant = TrainConfig(**base, schedule="constant")
    for config in (cosine, linear, constant):                       # linear warmup from 0 to lr
        assert lr_at(0, config) == 0.0
        assert lr_at(5, config) == pytest.approx(0.5e-3)
        assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(60, cosine) == pytest.approx((1e-3 + 1e-4) / 2)    # cos(π/2) = 0: the midpoint
    assert lr_at(35, cosine) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cosine) == pytest.approx(1e-4)                # min_lr at max_steps
    assert lr_at(60, linear) == pytest.approx(5.5e-4)
    assert lr_at(110, linear) == pytest.approx(1e-4)
    assert lr_at(110, constant) == pytest.approx(1e-3)
    no_warmup = TrainConfig(out_dir=tmp_path, lr=1e-3, warmup_steps=0, max_steps=100)
    assert lr_at(1, no_warmup) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 100)))


def test_scheduler_applies_lr_at_n_to_update_n(tmp_path):
    config = TrainConfig(out_dir=tmp_path, lr=1e-2, min_lr=1e-3, warmup_steps=3, max_steps=8)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    for update in range(1, 9):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(update, config))
        optimizer.step()
        scheduler.step()


# ---- optimizer groups ------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_no_weight_decay_on_1d_params_and_frozen_params_excluded(tmp_path, name, cls):
    model = tiny_model()
    model.transformer.embed_positions.weight.requires_grad_(False)      # frozen, as PEFT would
    optimizer = build_optimizer(model, TrainConfig(out_dir=tmp_path, optimizer=name, weight_decay=0.1))
    assert type(optimizer) is cls
    groups = {g["group"]: g for g in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"]) and groups["no_decay"]["params"]
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.transformer.embed_positions.weight) not in optimized
    trainable = {id(p) for p in model.parameters() if p.requires_grad}       # tied head counted once
    assert optimized == trainable
    assert model.lm_head.bias is None or id(model.lm_head.bias) in {id(p) for p in groups["no_decay"]["params"]}


# ---- accumulation and clipping ---------------------------------------------------------------
@pytest.mark.parametrize("clip", [None, 0.1])
def test_accumulating_two_micro_batches_of_4_equals_one_batch_of_8(tmp_path, clip):
    # SGD, so a missing 1/grad_accum_steps would double the update (Adam would hide it).
    halves = TokenBatches(4)
    merged = [{"input_ids": torch.cat([next(halves)["input_ids"], next(halves)["input_ids"]])}]
    whole_model, whole_norm = _run_on(tmp_path / "whole", merged, accum=1, clip=clip)
    split_model, split_norm = _run_on(tmp_path / "split", TokenBatches(4), accum=2, clip=clip)
    assert split_norm == pytest.approx(whole_norm, rel=1e-6)             # the unclipped norm agrees
    if clip is not None:
        assert whole_norm > clip                                          # clipping was active
    for (name, a), b in zip(whole_model.state_dict().items(), split_model.state_dict().values()):
        assert (a - b).abs().max().item() <= 1e-6, name
    assert not torch.equal(whole_model.lm_head.weight, tiny_model().lm_head.weight)   # it did train


def _run_on(out_dir, data, *, accum, clip):
    model = tiny_model()
    norms = []
    callback = type("Norms", (), {"on_step_end": lambda self, t, s, m: norms.append(m["grad_norm"])})()
    config = quiet_config(out_dir, optimizer="sgd", lr=0.5, warmup_steps=0, schedule="constant",
                          max_steps=1, grad_accum_steps=accum, max_grad_norm=clip)
    Trainer(model, clm_loss, data, config=config, callbacks=[callback]).fit()
    return model, norms[0]


# ---- training works --------------------------------------------------------------------------
def test_loss_goes_down_and_run_outputs_are_written(tmp_path):
    recorder = LossRecorder()
    config = quiet_config(tmp_path, max_steps=40, warmup_steps=4, log_every=10, tensorboard=True, plot=True)
    result = Trainer(tiny_model(), clm_loss, TokenBatches(8), val_data=lambda: TokenBatches(8, seed=1),
                     config=config, callbacks=[recorder]).fit()
    assert result.status == "completed" and result.step == 40
    assert result.train_loss < recorder.losses[0] - 1.0, recorder.losses
    assert result.val_loss is not None and result.val_loss < recorder.losses[0] - 1.0
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "loss.png").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    assert set(result.metrics) >= {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "ppl"}
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 10, 20, 30, 40]
    assert set(train[-1]) >= {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "ppl"}
    assert [r["step"] for r in records if r["split"] == "val"] == [40]


def test_evaluation_never_shifts_the_training_random_stream(tmp_path):
    def loss_fn(model, batch):
        if not model.training:                          # evaluation consumes torch, python and numpy RNG
            torch.rand(100), random.random(), np.random.rand()
        return clm_loss(model, batch)

    def run(name, val_data):
        trainer = Trainer(tiny_model(dropout=0.2), loss_fn, TokenBatches(4), val_data=val_data,
                          config=quiet_config(tmp_path / name, max_steps=4, eval_every=1, eval_batches=2))
        trainer.fit()
        return trainer.model.state_dict()

    plain, evaluated = run("plain", None), run("evaluated", [next(TokenBatches(4))] * 2)
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    seen = []

    def loss_fn(model, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return clm_loss(model, batch)

    recorder = LossRecorder()
    config = quiet_config(tmp_path, precision="bf16", max_steps=25, device="cpu")
    Trainer(tiny_model(), loss_fn, TokenBatches(8), config=config, callbacks=[recorder]).fit()
    assert seen[0] == (True, torch.bfloat16)
    assert recorder.losses[-1] < recorder.losses[0] - 0.5, recorder.losses


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"precision='fp16'.*CUDA.*bf16"):
        Trainer(tiny_model(), clm_loss, TokenBatches(8), config=quiet_config(tmp_path, precision="fp16", device="cpu"))


def test_bad_config_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"TrainConfig.lr='1e-3'.*float.*YAML"):
        TrainConfig(out_dir=tmp_path, lr="1e-3")
    with pytest.raises(ConfigError, match=r"TrainConfig.optimizer='adamx'.*adamw"):
        TrainConfig(out_dir=tmp_path, optimizer="adamx")
    with pytest.raises(ConfigError, match=r"grad_accum_steps=0.*positive integer"):
        TrainConfig(out_dir=tmp_path, grad_accum_steps=0)
    with pytest.raises(ConfigError, match=r"no field 'warmup'.*'warmup_steps'"):
        TrainConfig.from_dict({"warmup": 10})
    assert TrainConfig.from_dict(TrainConfig(out_dir=tmp_path, betas=[0.9, 0.99]).to_dict()).betas == (0.9, 0.99)


def test_finite_iterator_running_out_is_a_clear_error(tmp_path):
    data = iter([{"input_ids": torch.zeros(2, 8, dtype=torch.long)}] * 3)
    with pytest.raises(ValueError, match="train_data ran out at step 4"):
        Trainer(tiny_model(), clm_loss, data, config=quiet_config(tmp_path, max_steps=5)).fit()


def test_a_list_is_cycled_in_epochs(tmp_path):
    data = [next(TokenBatches(4)) for _ in range(2)]
    result = Trainer(tiny_model(), clm_loss, data, val_data=data, config=quiet_config(tmp_path, max_steps=5)).fit()
    assert result.step == 5 and result.val_loss is not None


# ---- callbacks -------------------------------------------------------------------------------
class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def on_step_start(self, trainer, step):
        self.log.append((self.name, "start", step))

    def on_after_backward(self, trainer, step):
        assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)
        self.log.append((self.name, "backward", step))

    def on_step_end(self, trainer, step, metrics):
        assert trainer.step == step and {"loss", "lr", "grad_norm"} <= set(metrics)
        self.log.append((self.name, "end", step))

    def on_eval(self, trainer, step, metrics):
        self.log.append((self.name, "eval", step))

    def on_train_end(self, trainer):
        self.log.append((self.name, "train_end", trainer.step))


def test_callbacks_run_in_the_order_given(tmp_path):
    log = []
    model = tiny_model()
    partial = type("OnlyEnd", (), {"on_step_end": lambda self, t, s, m: log.append(("partial", "end", s))})()
    config = quiet_config(tmp_path, max_steps=4, grad_accum_steps=2, eval_every=2)
    Trainer(model, clm_loss, TokenBatches(4), val_data=[next(TokenBatches(4))], config=config,
            callbacks=[Recorder("model", log), Recorder("user", log), partial]).fit()
    expected = []
    for step in range(1, 5):
        for hook in ("start", "backward", "end") + (("eval",) if step % 2 == 0 else ()):
            expected += [(n, hook, step) for n in ("model", "user", "partial") if n != "partial" or hook == "end"]
    expected += [("model", "train_end", 4), ("user", "train_end", 4)]
    assert log == expected


def test_request_stop_checkpoints_and_returns_stopped(tmp_path):
    stopper = type("Stop", (), {"on_step_end": lambda self, t, s, m: t.request_stop() if s == 3 else None})()
    result = Trainer(tiny_model(), clm_loss, TokenBatches(4), config=quiet_config(tmp_path, max_steps=10),
                     callbacks=[stopper]).fit()
    assert (result.status, result.step) == ("stopped", 3)
    assert result.checkpoint.name == "step_0000003" and result.checkpoint.is_dir()


# ---- the causal LM objective -----------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits, self.kwargs = logits, {}

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.kwargs = kwargs
        return type("Out", (), {"logits": self.logits})()


def test_clm_loss_is_the_mean_next_token_nll():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)                                      # (B, T, V)
    ids = torch.randint(0, 7, (2, 5))
    log_probs = F.log_softmax(logits, dim=-1)
    nll = [-log_probs[b, t, ids[b, t + 1]] for b in range(2) for t in range(4)]
    loss, metrics = clm_loss(FixedLogits(logits), {"input_ids": ids})
    assert loss.item() == pytest.approx(torch.stack(nll).mean().item(), abs=1e-6)
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)

    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0                                                    # two padded positions
    kept = [-log_probs[b, t, ids[b, t + 1]] for b in range(2) for t in range(4) if mask[b, t + 1]]
    loss, _ = clm_loss(FixedLogits(logits), {"input_ids": ids, "attention_mask": mask})
    assert loss.item() == pytest.approx(torch.stack(kept).mean().item(), abs=1e-6)

    labels = ids.clone()
    labels[0, :3] = -100                                               # a prompt that is not trained on
    kept = [-log_probs[b, t, ids[b, t + 1]] for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    loss, _ = clm_loss(FixedLogits(logits), {"input_ids": ids, "labels": labels})
    assert loss.item() == pytest.approx(torch.stack(kept).mean().item(), abs=1e-6)


def test_clm_loss_accepts_pre_shifted_targets_and_position_ids():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)                                      # (B, T, V)
    targets = torch.randint(0, 7, (2, 4))                              # targets[t] follows input_ids[t]
    targets[1, 0] = -100
    log_probs = F.log_softmax(logits, dim=-1)
    kept = [-log_probs[b, t, targets[b, t]] for b in range(2) for t in range(4) if targets[b, t] != -100]
    model = FixedLogits(logits)
    positions = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])
    loss, _ = clm_loss(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long), "targets": targets,
                               "position_ids": positions})
    assert loss.item() == pytest.approx(torch.stack(kept).mean().item(), abs=1e-6)
    assert model.kwargs["position_ids"] is positions


def test_trains_and_resumes_on_the_data_pipeline_batches(tmp_path):
    from llmkit.data import RandomWindowBatches
    tokens = (torch.arange(4000) * 7 % 32).numpy()                     # a learnable periodic stream

    def run(out, stop_at=None, resume=False):
        trainer = Trainer(tiny_model(dropout=0.1), clm_loss, RandomWindowBatches(tokens, 8, 16, seed=3),
                          config=quiet_config(out, max_steps=12, resume=resume),
                          callbacks=[StopAt(stop_at)] if stop_at else [])
        return trainer, trainer.fit()

    straight, result = run(tmp_path / "a")
    assert result.train_loss < 2.5                                     # from ln 32 = 3.47
    run(tmp_path / "b", stop_at=5)
    resumed, _ = run(tmp_path / "b", resume=True)
    assert resumed.train_data.state_dict() == straight.train_data.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))


def test_clm_loss_is_fp32_under_bf16_logits():
    logits = torch.randn(1, 4, 7).bfloat16()
    loss, _ = clm_loss(FixedLogits(logits), {"input_ids": torch.tensor([[1, 2, 3, 4]])})
    assert loss.dtype == torch.float32
