"""DDP and FSDP2 on 2 CPU processes (gloo, torchrun) match one process on the same global batch."""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_worker import LossRecorder, StopAt, TokenBatches, quiet_config, tiny_model
from llmkit.config import ConfigError
from llmkit.objectives import clm_loss
from llmkit.train import Trainer, find_latest, load_checkpoint, load_model_tensors

WORKER = Path(__file__).with_name("dist_worker.py")
# Global batch 8 (4 per rank), 2 micro-batches per step (gradient sync skipped on the first),
# a 5-step schedule, stopped and checkpointed at step 3, then resumed on one process.
COMMON = dict(max_steps=5, grad_accum_steps=2, warmup_steps=2)
# (kind, preset, optimizer): GPT-2 (tied head, biases) with SGD + momentum, no clipping, so a
# wrong gradient scale changes the weights; Llama with AdamW and active clipping (the DTensor
# paths of FSDP2). Parameters are held to 1e-6 in both. GPT-2 is not run with Adam here: its key
# bias has an analytically zero gradient (softmax ignores a per-query constant), and Adam's
# m/sqrt(v) turns the reduction-order noise in it (~1e-10) into O(lr) steps.
SETUPS = {"gpt2-sgd": dict(preset="gpt2-tiny", optimizer="sgd", lr=0.1, max_grad_norm=None),
          "llama-adamw": dict(preset="llama-tiny", optimizer="adamw", lr=1e-3, max_grad_norm=0.5)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir: Path, kind: str, setup: dict) -> dict:
    args = ["--max-steps", "5", "--accum", "2", "--global-batch", "8", "--stop-at", "3",
            "--preset", setup["preset"], "--optimizer", setup["optimizer"], "--lr", str(setup["lr"])]
    args += ["--clip", str(setup["max_grad_norm"])] if setup["max_grad_norm"] else []
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(WORKER), str(out_dir), "--distributed", kind, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_NO_PROGRESS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    if proc.returncode != 0 and "RESULT" in proc.stdout and "terminate called without an active exception" in proc.stderr:
        # A rank aborted in C++ teardown after finishing its work and printing its result (seen once
        # in a fresh-clone run, 2026-12-07, FSDP + gloo on 2 CPU processes). Run once more from an
        # empty folder; any other failure, or this one twice, fails the test.
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(re.search(r"RESULT (.*)", proc.stdout).group(1))


def _config(out_dir, setup: dict, **overrides):
    return quiet_config(out_dir, **COMMON, optimizer=setup["optimizer"], lr=setup["lr"],
                        max_grad_norm=setup["max_grad_norm"], **overrides)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference per setup: one process, batch 8, stopped at step 3, then resumed to step 5."""
    cache = {}

    def run(name: str):
        if name not in cache:
            setup, out = SETUPS[name], tmp_path_factory.mktemp(name)
            recorder = LossRecorder()
            first = Trainer(tiny_model(preset=setup["preset"]), clm_loss, TokenBatches(8),
                            config=_config(out, setup), callbacks=[recorder, StopAt(3)])
            first.fit()
            at_3 = {k: v.clone() for k, v in first.model.state_dict().items()}
            resumed = Trainer(tiny_model(preset=setup["preset"]), clm_loss, TokenBatches(8),
                              config=_config(out, setup, resume=True))
            resumed.fit()
            cache[name] = (recorder, at_3, resumed.model.state_dict())
        return cache[name]
    return run


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", sorted(SETUPS))
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_resume_on_one_process(tmp_path, single_process, kind, name):
    setup = SETUPS[name]
    reference, weights_at_3, weights_at_5 = single_process(name)
    result = _torchrun(tmp_path, kind, setup)
    assert (result["status"], result["step"], result["world_size"]) == ("stopped", 3, 2)
    # Logged metrics are all-reduced means over ranks == those of the global batch.
    assert max(abs(a - b) for a, b in zip(result["losses"], reference.losses)) <= 1e-6
    assert result["grad_norms"] == pytest.approx(reference.grad_norms, rel=1e-5)

    # Rank 0 wrote the full (unsharded) state dict; it loads into a plain single-process model.
    path = find_latest(tmp_path)
    assert path.name == "step_0000003" and not list(tmp_path.glob("checkpoints/*.tmp-*"))
    model = tiny_model(seed=5, preset=setup["preset"])
    state = load_checkpoint(path, model)
    assert state["world_size"] == 2 and len(state["data"]) == 2 and len(state["rng"]) == 2
    assert _max_diff(model.state_dict(), weights_at_3) <= 1e-6
    assert _max_diff(model.state_dict(), tiny_model(preset=setup["preset"]).state_dict()) > 1e-3   # it trained
    exported = tiny_model(seed=6, preset=setup["preset"])                # the export path: plain load_state_dict
    exported.load_state_dict(load_model_tensors(path))
    assert _max_diff(exported.state_dict(), model.state_dict()) == 0

    # ... and training resumes from it on one process, the data continuing at global batch 3 * 2.
    resumed = Trainer(tiny_model(seed=5, preset=setup["preset"]), clm_loss, TokenBatches(8),
                      config=_config(tmp_path, setup, resume=str(path)))
    assert resumed.fit().step == 5 and resumed.train_data.index == 5 * 2
    assert _max_diff(resumed.model.state_dict(), weights_at_5) <= 1e-6


def test_ctrl_c_under_torchrun_checkpoints_on_every_rank_and_stops(tmp_path):
    """The terminal's Ctrl-C goes to torchrun's process group; the agent forwards SIGINT to the workers."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(tmp_path),
               "--distributed", "fsdp", "--max-steps", "100000", "--step-sleep", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_NO_PROGRESS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while _lines(tmp_path / "metrics.jsonl") < 3:
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.time() < deadline, "torchrun never trained 3 steps"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    match = re.search(r"RESULT (.*)", stdout)
    assert match, stderr[-4000:]
    result = json.loads(match.group(1))
    assert result["status"] == "interrupted" and result["step"] >= 3
    path = find_latest(tmp_path)
    assert path.name == f"step_{result['step']:07d}"
    assert load_checkpoint(path, tiny_model())["world_size"] == 2


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_distributed_none_under_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"distributed='none'.*WORLD_SIZE=2.*'ddp' or 'fsdp'"):
        Trainer(tiny_model(), clm_loss, TokenBatches(4), config=quiet_config(tmp_path))


def test_ddp_without_torchrun_trains_as_one_process(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="not launched by torchrun"):
        trainer = Trainer(tiny_model(), clm_loss, TokenBatches(4), config=quiet_config(tmp_path, distributed="ddp"))
    assert (trainer.rank, trainer.world_size) == (0, 1)
    assert trainer.fit().step == 10
    assert not torch.distributed.is_initialized()
