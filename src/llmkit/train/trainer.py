"""`Trainer`: the one training loop every objective, PEFT method and alignment loss plugs into.

One optimizer step (step N, 1-based) is:

    on_step_start(trainer, N)
    for each of grad_accum_steps micro-batches:               (gradient sync on the last one only)
        loss, metrics = loss_fn(model, batch)                 (under autocast for bf16/fp16)
        backward(loss / grad_accum_steps)                     (GradScaler for fp16)
    non-finite loss (mean over micro-batches and ranks) -> TrainingDiverged
    on_after_backward(trainer, N)                             (true-scale gradients, before clipping)
    clip the global gradient norm (non-finite -> TrainingDiverged: nothing applied or saved)
    optimizer.step(); scheduler.step(); zero_grad
    on_step_end(trainer, N, metrics)       (a callback may add scalars to metrics: they are logged)
    log every log_every; eval every eval_every; checkpoint every save_every

Accumulating loss / k over k micro-batches gives the gradient of the mean loss of the k·b
examples (for losses that are means over equal-size micro-batches), so batch 8 == 2 × 4.
Resume is exact: the checkpoint holds weights, optimizer, scheduler, GradScaler, data position
and every RNG, and evaluation runs under a forked RNG so it never shifts the training stream.
"""
from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from ..io.errors import CheckpointError
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .compile import CompileClock, compile_module
from .config import TrainConfig
from .logging import ProgressBar, RunLogger, plot_losses
from .optim import build_optimizer, build_scheduler
from .selection import Selection, scalars

CALLBACK_HOOKS = ("on_step_start", "on_after_backward", "on_step_end", "on_eval", "on_train_end")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; nothing of that step was applied or saved."""


@dataclass
class TrainResult:
    step: int                          # optimizer steps completed
    train_loss: Optional[float]        # loss of the last step
    val_loss: Optional[float]          # loss of the last evaluation (None without val_data)
    status: str                        # "completed" | "interrupted" (Ctrl-C) | "stopped" (request_stop)
    checkpoint: Optional[Path] = None  # the last checkpoint written or resumed from
    metrics: dict = field(default_factory=dict)
    compile_seconds: float = 0.0       # time spent in torch.compile (train.compile), apart from the steps
    best_step: Optional[int] = None    # the evaluation with the best eval_metric (config.eval_metric set)
    best_value: Optional[float] = None
    best_metrics: Optional[dict] = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)             # also seeds every CUDA device


class Trainer:
    """Train `model` on `loss_fn(model, batch) -> (loss, metrics)` over `train_data`.

    train_data: an iterator of batches (dicts of tensors); if it has state_dict()/load_state_dict()
        its position is checkpointed. A re-iterable (a list) is cycled in epochs.
    val_data: a callable returning a fresh iterable of batches, or a list of batches.
    evaluator: `evaluator(model, val_data) -> metrics` replaces the default evaluation (the mean of
        loss_fn over eval_batches batches): a fine-tuning Task scores its whole dev set with it.
    callbacks: objects with any of CALLBACK_HOOKS, passed explicitly (a PEFT handle's per-step hooks
        come from `handle.callbacks()`).
    Selection (config.eval_metric): after each evaluation the best value so far is tracked; with
    keep_best its weights are kept in memory and restored at the end, and `patience` evaluations
    without an improvement of more than min_delta stop the run early (status "stopped").
    Under torchrun, construct it on every rank; `loss_fn` receives the wrapped model (DDP or the
    FSDP2-sharded model). `trainer.model` is the bare module, except that FSDP2 shards it in place:
    after fit() its parameters are DTensors of a destroyed process group, so export from the final
    checkpoint instead (`fresh.load_state_dict(load_model_tensors(result.checkpoint))`).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, train_data: Iterable, *, val_data: Any = None,
                 config: Optional[TrainConfig] = None, callbacks: Iterable = (), evaluator: Optional[Callable] = None):
        self.config = config = config if config is not None else TrainConfig()
        if (val_data is not None and evaluator is None and not callable(val_data)
                and not isinstance(val_data, (list, tuple))):
            raise TypeError(f"val_data={type(val_data).__name__}: expected a callable returning an iterable "
                            "of batches, or a list of batches")
        self.loss_fn, self.train_data, self.val_data, self.evaluator = loss_fn, train_data, val_data, evaluator
        self.callbacks = list(callbacks)
        self.best = Selection(config)
        self.dist = dist_utils.setup(config.distributed, config.device)
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.is_main = self.dist.is_main
        self.out_dir = Path(config.out_dir)
        dist_utils.check_precision(config.precision, self.device)
        self.model = model.to(self.device)
        self.wrapped_model = dist_utils.wrap_model(self.model, self.dist)
        if config.compile:               # the loss_fn gets the compiled wrapper; saves use the bare module
            self.wrapped_model = compile_module(self.wrapped_model)
        self.compile_clock = CompileClock()
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.step = 0
        self.last_checkpoint: Optional[Path] = None
        self._saved_step: Optional[int] = None
        self._interrupted = self._stop_requested = False
        self._data_iter = train_data if hasattr(train_data, "__next__") else iter(train_data)

    # ---- public helpers --------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to checkpoint and return status "stopped" at the next step boundary."""
        self._stop_requested = True

    def autocast(self):
        if self.config.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def fit(self) -> TrainResult:
        cfg = self.config
        seed_everything(cfg.seed + self.rank)
        self._resume()
        logger = RunLogger(self.out_dir, tensorboard=cfg.tensorboard, enabled=self.is_main)
        bar = ProgressBar(cfg.max_steps, initial=self.step, enabled=self.is_main and cfg.progress)
        previous_handlers = self._install_signals()
        if cfg.compile:
            self.compile_clock.start()
        status, val_loss, evaluated_at = "completed", None, None
        last: dict[str, float] = {}
        window: list[dict[str, float]] = []
        try:
            while self.step < cfg.max_steps:
                step = self.step + 1
                self._call("on_step_start", step)
                metrics = self._train_step(step)
                self.step, last = step, metrics
                self._call("on_step_end", step, metrics)     # before logging: callbacks may add metrics
                window.append(metrics)
                bar.update(step, loss=metrics["loss"], lr=metrics["lr"], tok_per_s=metrics["tokens_per_s"])
                if step % cfg.log_every == 0 or step == 1 or step == cfg.max_steps:
                    logger.log(step, _window_summary(window))
                    window = []
                if self.val_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    val_loss, evaluated_at = self._evaluate_and_log(logger, step), step
                if cfg.save_every and step % cfg.save_every == 0:
                    self._save()
                stop = self._should_stop()
                if stop:
                    status = stop
                    break
            if status == "completed" and self.val_data is not None and evaluated_at != self.step:
                val_loss = self._evaluate_and_log(logger, self.step)
            if self._saved_step != self.step:
                self._save()
            if status != "completed" and self.is_main:
                print(f"\n{status} at step {self.step}: checkpoint saved to {self.last_checkpoint}",
                      file=sys.stderr, flush=True)
            self.best.restore(self.model)
            self._call("on_train_end")
        except TrainingDiverged:
            dist_utils.teardown(self.dist)   # every rank saw the same reduced loss: safe to sync
            raise
        finally:
            self.compile_clock.stop()
            self._restore_signals(previous_handlers)
            bar.close()
            logger.close()
        if cfg.plot and self.is_main and logger.jsonl_path.is_file() and logger.jsonl_path.stat().st_size:
            plot_losses(logger.jsonl_path, self.out_dir / "loss.png")
        dist_utils.teardown(self.dist)
        return TrainResult(self.step, last.get("loss"), val_loss, status, self.last_checkpoint, last,
                           compile_seconds=self.compile_clock.seconds, best_step=self.best.step,
                           best_value=self.best.value, best_metrics=self.best.metrics)

    # ---- one optimizer step ----------------------------------------------------------------------
    def _train_step(self, step: int) -> dict[str, float]:
        cfg, model = self.config, self.wrapped_model
        model.train()
        started = time.perf_counter()
        loss_total = torch.zeros((), device=self.device)
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum_steps):
            batch = dist_utils.move_to(self._next_batch(step), self.device)
            if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
                tokens += batch["input_ids"].numel()
            with dist_utils.gradient_sync(model, enabled=micro == cfg.grad_accum_steps - 1):
                with self.autocast():
                    loss, extra = self.loss_fn(model, batch)
                scaled = loss.float() / cfg.grad_accum_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_total += loss.detach().float()
            for k, v in (extra or {}).items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + float(v)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)                # true-scale gradients from here on
        names = sorted(sums)
        reduced = dist_utils.reduce_mean([loss_total.item() / cfg.grad_accum_steps, float(tokens)]
                                         + [sums[k] / cfg.grad_accum_steps for k in names], self.dist)
        step_loss = reduced[0]
        if not math.isfinite(step_loss):
            self._diverged(step, f"loss={step_loss}")
        self._call("on_after_backward", step)
        grad_norm = self._clip_gradients()
        if self.scaler is None and not math.isfinite(grad_norm):   # (fp16: the scaler skips the step)
            self._diverged(step, f"grad_norm={grad_norm} (loss={step_loss})")
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        global_tokens = reduced[1] * self.world_size
        metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": global_tokens,
                   "tokens_per_s": global_tokens / max(elapsed, 1e-9), "step_time_s": elapsed}
        metrics.update(zip(names, reduced[2:]))
        return metrics

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _clip_gradients(self) -> float:
        """Clip the global L2 norm to max_grad_norm (if set); return the norm before clipping."""
        params = self._trainable()
        if not params:
            return 0.0
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        return float((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item())   # FSDP2: DTensor

    def _diverged(self, step: int, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was saved before it")
        raise TrainingDiverged(f"training diverged at step {step}: {what}; nothing of this step was applied "
                               f"or saved, and {kept} (resume from it with a lower lr, more warmup or "
                               "max_grad_norm)")

    def _next_batch(self, step: int) -> Any:
        try:
            return next(self._data_iter)
        except StopIteration:
            if self._data_iter is self.train_data:
                raise ValueError(f"train_data ran out at step {step} of max_steps={self.config.max_steps}: "
                                 "expected an endless iterator, or a list to cycle through") from None
            self._data_iter = iter(self.train_data)           # a re-iterable: next epoch
            return next(self._data_iter)

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss (and loss_fn metrics) over eval_batches validation batches, averaged over ranks.
        Runs under a forked RNG, so evaluating never changes the training run that follows."""
        if self.val_data is None:
            raise ValueError("evaluate() needs val_data")
        if self.evaluator is not None:
            with _preserved_rng(self.device):
                return self.evaluator(self.model, self.val_data)
        model = self.wrapped_model
        batches = self.val_data() if callable(self.val_data) else self.val_data
        sums: dict[str, float] = {}
        count = 0
        model.eval()
        try:
            with _preserved_rng(self.device), self.autocast(), torch.no_grad():
                for batch in batches:
                    if count >= self.config.eval_batches:
                        break
                    loss, extra = self.loss_fn(model, dist_utils.move_to(batch, self.device))
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach().float().item())
                    for k, v in (extra or {}).items():
                        if k != "loss":
                            sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
        finally:
            model.train()
        if count == 0:
            raise ValueError("val_data yielded no batch: expected at least one")
        names = sorted(sums)
        metrics = dict(zip(names, dist_utils.reduce_mean([sums[k] / count for k in names], self.dist)))
        if "ppl" in metrics:  # perplexity of the mean loss, not the mean of per-batch perplexities
            metrics["ppl"] = math.exp(min(metrics["loss"], 80.0))
        return metrics

    def _evaluate_and_log(self, logger: RunLogger, step: int) -> float:
        metrics = self.evaluate()
        logger.log(step, scalars(metrics), split="val")
        if self.best.update(step, metrics, self.model) and self.is_main:
            print(f"\nearly stopping at step {step}: {self.best.bad_evals} evaluations without improvement",
                  file=sys.stderr, flush=True)
            self.request_stop()
        self._call("on_eval", step, metrics)
        return metrics.get("loss")

    # ---- checkpoints -----------------------------------------------------------------------------
    def _save(self) -> Path:
        data_state = self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None
        data_states = dist_utils.gather_json(data_state, self.dist)
        rng_states = dist_utils.gather_json(ckpt.capture_rng(), self.dist)
        extra = {"world_size": self.world_size, "data": data_states, "config": self.config.to_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        path = ckpt.save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.scheduler,
                                    extra_state=extra, rng_states=rng_states,
                                    keep_last=self.config.keep_last, write=self.is_main)
        dist_utils.barrier(self.dist)
        self.last_checkpoint, self._saved_step = path, self.step
        return path

    def _resume(self) -> None:
        mode = self.config.resume_mode
        if mode is None:
            return
        if mode == "auto":
            path = ckpt.find_latest(self.out_dir)
            if path is None:
                return                                        # nothing to resume: a fresh start
        else:
            path = Path(mode)
            if not (path / ckpt.STATE_FILE).is_file():
                found = ckpt.find_latest(path) if path.is_dir() else None
                if found is None:
                    raise CheckpointError(f"TrainConfig.resume={mode!r}: expected a checkpoint directory "
                                          f"(holding {ckpt.STATE_FILE}) or a run directory with checkpoints/")
                path = found
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        same_layout = state.get("world_size", 1) == self.world_size
        data_states, rng_states = state.get("data") or [], state.get("rng") or []
        # Across world sizes a data position carries over only when every rank saved the same one
        # (llmkit.data's loaders count global batches); RNG streams are per rank and start afresh.
        shared = bool(data_states) and all(d == data_states[0] for d in data_states)
        data_state = (data_states[self.rank] if same_layout and len(data_states) > self.rank
                      else data_states[0] if shared else None)
        if data_state is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(data_state)
        if same_layout and len(rng_states) > self.rank:
            ckpt.restore_rng(rng_states[self.rank])
        elif self.is_main:
            print(f"resuming a {state.get('world_size')}-rank checkpoint on {self.world_size} rank(s): weights, "
                  f"optimizer and schedule restored, data position {'restored' if shared else 'NOT restored'}, "
                  "RNG streams start afresh", file=sys.stderr)
        self.step = self._saved_step = int(state["step"])
        self.last_checkpoint = path

    # ---- control ---------------------------------------------------------------------------------
    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def _should_stop(self) -> Optional[str]:
        flags = dist_utils.reduce_mean([float(self._interrupted), float(self._stop_requested)], self.dist, op="max")
        return "interrupted" if flags[0] else ("stopped" if flags[1] else None)

    def _install_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM (a scheduler's or `kill`'s stop): finish the step, checkpoint,
        return "interrupted", so the run resumes where it stopped; a second signal aborts
        (KeyboardInterrupt). Under torchrun the agent forwards one SIGINT/SIGTERM to each worker and
        waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) before SIGKILL."""
        if threading.current_thread() is not threading.main_thread():
            return None
        self._interrupted = False

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            if self.is_main:
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                print(f"\n{name}: saving a checkpoint at the end of this step (send it again to abort)",
                      file=sys.stderr, flush=True)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signals(previous) -> None:
        if previous is not None and threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _window_summary(window: list[dict[str, float]]) -> dict[str, float]:
    """Means over the steps since the last log line; lr is the latest, tokens/s the window's rate."""
    summary = {}
    for key in window[-1]:
        if key not in ("tokens", "tokens_per_s"):      # a callback's metric may start mid-window
            values = [m[key] for m in window if key in m]
            summary[key] = sum(values) / len(values)
    seconds = sum(m["step_time_s"] for m in window)
    summary["tokens_per_s"] = sum(m["tokens"] for m in window) / max(seconds, 1e-9)
    summary["lr"] = window[-1]["lr"]
    return summary


@contextmanager
def _preserved_rng(device: torch.device):
    """Fork the torch (and CUDA), python and numpy generators; restore them on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
