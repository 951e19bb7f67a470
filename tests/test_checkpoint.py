"""Checkpoints: exact resume, layout without pickle, atomic writes under SIGKILL, keep-last, NaN, Ctrl-C."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dist_worker import StopAt, TokenBatches, quiet_config, tiny_model
from llmkit.io.errors import CheckpointError
from llmkit.objectives import clm_loss
from llmkit.train import (Trainer, TrainingDiverged, build_optimizer, find_latest, load_checkpoint,
                          save_checkpoint)
from llmkit.train.checkpoint import list_checkpoints

WORKER = Path(__file__).with_name("dist_worker.py")


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_is_bitwise_exact_with_dropout_and_accumulation(tmp_path, optimizer):
    """20 straight steps == 10 steps, a new Trainer(resume=True), 10 more (eval in between too)."""
    def run(out_dir, stop_at=None, resume=False):
        model = tiny_model(dropout=0.1)
        config = quiet_config(out_dir, optimizer=optimizer, max_steps=20, warmup_steps=3, grad_accum_steps=2,
                              eval_every=4, save_every=0, resume=resume, weight_decay=0.1)
        trainer = Trainer(model, clm_loss, TokenBatches(4), val_data=lambda: TokenBatches(4, seed=7),
                          config=config, callbacks=[StopAt(stop_at)] if stop_at else [])
        return trainer, trainer.fit()

    straight, result = run(tmp_path / "straight")
    assert result.step == 20
    first, stopped = run(tmp_path / "resumed", stop_at=10)
    assert (stopped.status, stopped.step) == ("stopped", 10)
    torch.manual_seed(123)                                   # resuming must not depend on the ambient RNG
    resumed, result = run(tmp_path / "resumed", resume=True)
    assert result.step == 20 and resumed.train_data.index == straight.train_data.index == 40
    _assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    for (pa, sa), (pb, sb) in zip(straight.optimizer.state.items(), resumed.optimizer.state.items()):
        assert pa.shape == pb.shape
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    assert not torch.equal(first.model.lm_head.weight, resumed.model.lm_head.weight)


def test_layout_is_safetensors_and_json_with_tied_weights_once(tmp_path):
    model = tiny_model()
    Trainer(model, clm_loss, TokenBatches(4), config=quiet_config(tmp_path, max_steps=2)).fit()
    path = find_latest(tmp_path)
    assert path == tmp_path / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                      "rng.safetensors", "trainer_state.json"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        aliases = json.loads(f.metadata()["aliases"])
        assert aliases == {"lm_head.weight": "transformer.embed_tokens.weight"}
        assert "lm_head.weight" not in f.keys()
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        assert "state.transformer.layers.0.self_attn.q_proj.weight.exp_avg" in f.keys()
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"] == [{"index": 2}] and state["config"]["max_steps"] == 2
    assert state["scheduler"]["last_epoch"] == 2 and len(state["rng"][0]["python"][1]) == 625

    fresh = tiny_model(seed=1)
    optimizer = build_optimizer(fresh, quiet_config(tmp_path))
    load_checkpoint(path, fresh, optimizer)
    _assert_same_state(model.state_dict(), fresh.state_dict())
    assert fresh.lm_head.weight is fresh.transformer.embed_tokens.weight      # still tied
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_keep_last_and_find_latest_ignore_temporary_and_incomplete_dirs(tmp_path):
    Trainer(tiny_model(), clm_loss, TokenBatches(4),
            config=quiet_config(tmp_path, max_steps=10, save_every=2, keep_last=2)).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000008", "step_0000010"]
    root = tmp_path / "checkpoints"
    (root / "step_0000012.tmp-999999").mkdir()                                   # a torn write
    incomplete = root / "step_0000011"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"")
    assert find_latest(tmp_path) == root / "step_0000010"
    (root / "latest").unlink()                                                    # pointer lost
    assert find_latest(tmp_path) == root / "step_0000010"
    (root / "latest").write_text("step_0000008\n")                                # pointer wins
    assert find_latest(tmp_path) == root / "step_0000008"
    assert find_latest(tmp_path / "nowhere") is None


def test_resume_from_a_missing_path_is_a_clear_error(tmp_path):
    trainer = Trainer(tiny_model(), clm_loss, TokenBatches(4),
                      config=quiet_config(tmp_path, resume=str(tmp_path / "nowhere")))
    with pytest.raises(CheckpointError, match=r"TrainConfig.resume=.*nowhere.*expected a checkpoint directory"):
        trainer.fit()
    result = Trainer(tiny_model(), clm_loss, TokenBatches(4), config=quiet_config(tmp_path, resume=True)).fit()
    assert result.step == 10                                        # resume=True with nothing saved: a fresh start


def test_save_checkpoint_replaces_an_existing_step_atomically(tmp_path):
    model = tiny_model()
    first = save_checkpoint(tmp_path, 3, model)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    second = save_checkpoint(tmp_path, 3, model)
    assert first == second
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000003"]
    fresh = tiny_model(seed=2)
    load_checkpoint(second, fresh)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), "--max-steps", "6", "--save-every", "3",
                             "--block-on-save", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (out / "blocked").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "the worker never reached its second checkpoint"
            time.sleep(0.05)
    finally:
        proc.kill()                                                               # SIGKILL mid-write
        proc.wait()
    root = out / "checkpoints"
    torn = Path((out / "blocked").read_text())
    assert torn.is_dir() and ".tmp-" in torn.name and (torn / "model.safetensors").is_file()
    assert not (root / "step_0000006").exists()
    assert find_latest(out) == root / "step_0000003"
    model = tiny_model()
    state = load_checkpoint(find_latest(out), model, build_optimizer(model, quiet_config(out)))
    assert state["step"] == 3

    # Resuming continues from step 3, and the next save clears the dead process's temp dir.
    result = Trainer(tiny_model(), clm_loss, TokenBatches(8),
                     config=quiet_config(out, max_steps=6, save_every=3, resume=True, lr=3e-3)).fit()
    assert result.step == 6 and find_latest(out) == root / "step_0000006"
    assert not torn.exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_at_step_7_is_nan(model, batch):
        calls["n"] += 1
        loss, metrics = clm_loss(model, batch)
        return (loss * float("nan"), metrics) if calls["n"] == 7 else (loss, metrics)

    trainer = Trainer(tiny_model(), clm_loss, TokenBatches(4),
                      config=quiet_config(tmp_path, max_steps=20, save_every=5))
    trainer.loss_fn = loss_at_step_7_is_nan
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "step 7" in message and "loss=nan" in message and "step_0000005" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005"]
    assert trainer.step == 6 and not any(torch.equal(good[k], v) for k, v in trainer.model.state_dict().items()
                                         if k.endswith("q_proj.weight"))
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()                                           # the NaN step was not applied

    result = Trainer(tiny_model(), clm_loss, TokenBatches(4),
                     config=quiet_config(tmp_path, max_steps=8, resume=True)).fit()
    assert result.status == "completed" and result.step == 8


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), "--max-steps", "100000", "--step-sleep", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not _logged_steps(out / "metrics.jsonl") >= 3:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "the worker never trained 3 steps"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    result = json.loads(re.search(r"RESULT (.*)", stdout.decode()).group(1))
    assert result["status"] == "interrupted" and result["step"] >= 3
    assert "interrupted at step" in stderr.decode()
    path = find_latest(out)
    assert path.name == f"step_{result['step']:07d}"

    resumed = Trainer(tiny_model(), clm_loss, TokenBatches(8),
                      config=quiet_config(out, max_steps=result["step"] + 2, resume=True)).fit()
    assert resumed.status == "completed" and resumed.step == result["step"] + 2


def _logged_steps(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def test_sigint_handler_is_restored_and_a_second_ctrl_c_aborts(tmp_path):
    before = signal.getsignal(signal.SIGINT)

    class CtrlC:
        def __init__(self, times):
            self.times = times

        def on_step_end(self, trainer, step, metrics):
            if step == 2:
                for _ in range(self.times):
                    os.kill(os.getpid(), signal.SIGINT)

    result = Trainer(tiny_model(), clm_loss, TokenBatches(4), config=quiet_config(tmp_path / "a", max_steps=9),
                     callbacks=[CtrlC(1)]).fit()
    assert (result.status, result.step) == ("interrupted", 2) and result.checkpoint.name == "step_0000002"
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), clm_loss, TokenBatches(4), config=quiet_config(tmp_path / "b", max_steps=9),
                callbacks=[CtrlC(2)]).fit()
    assert signal.getsignal(signal.SIGINT) is before
