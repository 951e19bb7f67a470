"""Shared pieces of the trainer tests, and the script they run in subprocesses and under torchrun.

    python tests/dist_worker.py OUT_DIR [--distributed ddp|fsdp|none] [--max-steps N] [...]
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR --distributed fsdp

Rank 0 prints one line `RESULT {json}` (status, step, per-step losses, checkpoint) on stdout.
`--block-on-save K` makes the K-th checkpoint write its model file and then hang (after touching
OUT_DIR/blocked), so a test can SIGKILL the process in the middle of a checkpoint write.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import llmkit
from llmkit.objectives import clm_loss
from llmkit.train import TrainConfig, Trainer, rank_and_world_size

VOCAB = 32                     # ln 32 = 3.47 < 4: float32 losses carry half the rounding of ln 64
SEQ_LEN = 16


class TokenBatches:
    """Endless, seekable batches of sequences x_t = (a + b·t) mod V with b in 1..3 (learnable: the
    loss drops within tens of steps). Global batch i is fixed by (seed, i); rank r of W takes rows
    [r·B, (r+1)·B) of it, so W ranks with batch B see exactly what one process with batch W·B sees."""

    def __init__(self, batch_size: int = 8, seq_len: int = SEQ_LEN, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: int = 0):
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.index = seed, start

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        rows = self.batch_size * self.world_size
        a = torch.randint(0, VOCAB, (rows, 1), generator=g)
        b = torch.randint(1, 4, (rows, 1), generator=g)                                     # step 1-3
        ids = (a + b * torch.arange(self.seq_len)) % VOCAB                                 # (W·B, T)
        self.index += 1
        return {"input_ids": ids[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def tiny_model(dropout: float = 0.0, seed: int = 0, preset: str = "gpt2-tiny") -> torch.nn.Module:
    torch.manual_seed(seed)
    return llmkit.build_model(llmkit.get_preset(preset, vocab_size=VOCAB, max_seq_len=64, dropout=dropout))


def quiet_config(out_dir, **overrides) -> TrainConfig:
    """A TrainConfig for tests: no progress bar, TensorBoard or plot unless asked."""
    base = dict(out_dir=str(out_dir), lr=3e-3, max_steps=10, warmup_steps=2, log_every=5,
                progress=False, tensorboard=False, plot=False)
    return TrainConfig(**{**base, **overrides})


class LossRecorder:
    def __init__(self):
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_step_end(self, trainer, step, metrics):
        self.losses.append(metrics["loss"])
        self.grad_norms.append(metrics["grad_norm"])


class SlowSteps:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer, step, metrics):
        time.sleep(self.seconds)


class StopAt:
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.request_stop()


def block_on_save(out_dir: Path, nth: int) -> None:
    """Make the nth checkpoint hang right after writing its model file (for the kill test)."""
    from llmkit.train import checkpoint

    real_write, calls = checkpoint._write_tensors, {"n": 0}

    def write(tensors, path, metadata):
        real_write(tensors, path, metadata)
        if path.name == checkpoint.MODEL_FILE:
            calls["n"] += 1
            if calls["n"] == nth:
                (out_dir / "blocked").write_text(str(path.parent))
                time.sleep(600)

    checkpoint._write_tensors = write


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--distributed", default="none")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--block-on-save", type=int, default=0)
    parser.add_argument("--stop-at", type=int, default=0)
    parser.add_argument("--preset", default="gpt2-tiny")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out_dir = Path(args.out_dir)
    rank, world_size = rank_and_world_size()
    if args.block_on_save:
        block_on_save(out_dir, args.block_on_save)
    data = TokenBatches(args.global_batch // world_size, rank=rank, world_size=world_size)
    recorder = LossRecorder()
    callbacks = [recorder] + ([SlowSteps(args.step_sleep)] if args.step_sleep else [])
    callbacks += [StopAt(args.stop_at)] if args.stop_at else []
    config = quiet_config(out_dir, max_steps=args.max_steps, grad_accum_steps=args.accum,
                          save_every=args.save_every, max_grad_norm=args.clip, log_every=1,
                          distributed=args.distributed, keep_last=None, optimizer=args.optimizer, lr=args.lr)
    trainer = Trainer(tiny_model(args.dropout, preset=args.preset), clm_loss, data, config=config, callbacks=callbacks)
    result = trainer.fit()
    if rank == 0:
        print("RESULT " + json.dumps({"status": result.status, "step": result.step, "losses": recorder.losses,
                                      "grad_norms": recorder.grad_norms,
                                      "checkpoint": str(result.checkpoint), "world_size": trainer.world_size}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
