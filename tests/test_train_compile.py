"""train.compile and train.fused_optimizer: each gives the plain step's losses; compile reports its compile time."""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from dist_worker import LossRecorder, TokenBatches, quiet_config, tiny_model
from llmkit.config import ConfigError
from llmkit.objectives import clm_loss
from llmkit.train import TrainConfig, Trainer


@functools.lru_cache(maxsize=1)
def compiler_works() -> bool:
    """Inductor needs a working C++ compiler; probe it in a subprocess so a broken one cannot hang us."""
    probe = "import torch; f = torch.compile(lambda x: (x * 2).sin()); f(torch.ones(3))"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_compile_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match=r"TrainConfig.compile='yes': expected true or false"):
        TrainConfig(out_dir=tmp_path, compile="yes")


def test_a_compiled_step_gives_the_eager_losses_and_reports_compile_time(tmp_path):
    if not compiler_works():
        pytest.skip("torch.compile cannot run on this machine (no working C++ compiler for Inductor)")

    def run(name, compiled):
        recorder = LossRecorder()
        torch.manual_seed(0)
        trainer = Trainer(tiny_model(), clm_loss, TokenBatches(4), val_data=[next(TokenBatches(4, seed=1))],
                          config=quiet_config(tmp_path / name, max_steps=3, compile=compiled),
                          callbacks=[recorder])
        return trainer, trainer.fit(), recorder.losses

    _, eager, eager_losses = run("eager", False)
    trainer, compiled, compiled_losses = run("compiled", True)
    assert type(trainer.wrapped_model).__name__ == "OptimizedModule"
    assert eager.compile_seconds == 0.0
    assert compiled.compile_seconds > 0.0             # measured through dynamo's compile callbacks
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4), (compiled_losses, eager_losses)
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=1e-4)
    # the checkpoint holds the bare module's names, loadable without torch.compile
    assert compiled.checkpoint is not None and (compiled.checkpoint / "model.safetensors").is_file()


def test_fused_optimizer_gives_the_for_loop_losses(tmp_path):
    """train.fused_optimizer: torch's fused AdamW is the same update as the for-loop one (rounding apart)."""
    def run(name, fused):
        recorder = LossRecorder()
        torch.manual_seed(0)
        trainer = Trainer(tiny_model(), clm_loss, TokenBatches(4), config=quiet_config(
            tmp_path / name, max_steps=5, fused_optimizer=fused), callbacks=[recorder])
        trainer.fit()
        return trainer, recorder.losses
    plain, plain_losses = run("plain", False)
    fused, fused_losses = run("fused", True)
    assert fused.optimizer.defaults["fused"] is True and not plain.optimizer.defaults.get("fused")
    assert fused_losses == pytest.approx(plain_losses, abs=1e-5), (fused_losses, plain_losses)
    assert fused_losses[-1] < fused_losses[0]


def test_fused_optimizer_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match=r"TrainConfig.fused_optimizer=1: expected true or false"):
        TrainConfig(out_dir=tmp_path, fused_optimizer=1)
