"""`TrainConfig`: every knob of the training loop in one validated, serializable dataclass.

Recipes (YAML) map onto it one key per field; `TrainConfig.from_dict` names an unknown key and the
closest valid one, and `__post_init__` names the field, the value and what was expected.
Steps count optimizer updates: step N is the N-th update (each made of `grad_accum_steps`
micro-batches), and the checkpoint `step_N` holds the state after it.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..config import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    out_dir: Union[str, Path] = "runs/train"   # checkpoints/, metrics.jsonl, TensorBoard events, loss.png
    # ---- optimizer (optim.py) -------------------------------------------------------------------
    optimizer: str = "adamw"
    lr: float = 3e-4                  # peak learning rate, reached at the end of warmup
    betas: tuple = (0.9, 0.95)        # Adam(W) (beta1, beta2); 0.95 is the usual LLM choice
    eps: float = 1e-8
    momentum: float = 0.9             # SGD only
    weight_decay: float = 0.0         # applied to parameters with dim >= 2 only (never biases/norms)
    # ---- learning-rate schedule -----------------------------------------------------------------
    schedule: str = "cosine"          # after warmup: cosine or linear decay to min_lr, or constant
    warmup_steps: int = 0             # may exceed max_steps (a short trial run): lr then never peaks
    min_lr: float = 0.0
    max_steps: int = 1000
    # ---- step -----------------------------------------------------------------------------------
    grad_accum_steps: int = 1         # micro-batches per optimizer step
    max_grad_norm: Optional[float] = 1.0  # clip the global L2 norm; None = no clipping
    precision: str = "fp32"           # bf16 = autocast (CPU or CUDA); fp16 = autocast + GradScaler (CUDA)
    compile: bool = False             # forward + backward under torch.compile (compile.py); time reported apart
    fused_optimizer: bool = False     # Adam/AdamW through torch's fused kernel (optim.py); off = torch's default
    # ---- evaluation, logging, checkpoints -------------------------------------------------------
    eval_every: int = 0               # steps between evaluations; 0 = only at the end
    eval_batches: int = 20            # batches averaged per evaluation
    eval_metric: Optional[str] = None # select the best evaluation by this metric (loss, accuracy, ...);
                                      # None: no selection (fine-tuning then uses its task's metric)
    eval_mode: str = "auto"           # max | min; auto: min for loss / ppl, max otherwise
    keep_best: bool = True            # with eval_metric: restore the best evaluation's weights at the end
    patience: Optional[int] = None    # stop after this many evaluations without improvement
    min_delta: float = 0.0            # an improvement must beat the best by more than this
    log_every: int = 10
    save_every: int = 0               # steps between checkpoints; 0 = only at the end / on interrupt
    keep_last: Optional[int] = 3      # complete checkpoints kept; None = all
    seed: int = 0
    resume: Union[bool, str] = False  # False | True / "auto" (latest in out_dir) | a checkpoint path
    # ---- placement ------------------------------------------------------------------------------
    distributed: str = "none"         # ddp / fsdp under torchrun; see distributed.py
    device: str = "auto"              # auto = cuda if available, else cpu
    # ---- outputs --------------------------------------------------------------------------------
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        def fail(name: str, expected: str) -> None:
            value = getattr(self, name)
            hint = (" (YAML reads a number like 1e-3 as a string: write 1.0e-3)"
                    if isinstance(value, str) and _looks_numeric(value) else "")
            raise ConfigError(f"TrainConfig.{name}={value!r}: expected {expected}{hint}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def choice(name: str, allowed: tuple) -> None:
            if getattr(self, name) not in allowed:
                fail(name, f"one of {list(allowed)}")

        if not isinstance(self.out_dir, (str, Path)) or not str(self.out_dir):
            fail("out_dir", "a non-empty path")
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("precision", PRECISIONS)
        choice("distributed", DISTRIBUTED)
        choice("device", DEVICES)
        choice("eval_mode", ("auto", "max", "min"))
        if self.eval_metric is not None and not isinstance(self.eval_metric, str):
            fail("eval_metric", "a metric name (e.g. loss, accuracy) or None")
        if self.patience is not None and (not is_int(self.patience) or self.patience < 1):
            fail("patience", "a positive integer, or None for no early stopping")
        if self.patience is not None and self.eval_metric is None:
            fail("eval_metric", "a metric name: early stopping (patience) selects by it")
        if not is_number(self.min_delta) or self.min_delta < 0:
            fail("min_delta", "a non-negative float")
        for name in ("lr", "min_lr", "weight_decay", "momentum"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a non-negative float")
        if self.lr == 0:
            fail("lr", "a positive float")
        if self.min_lr > self.lr:
            fail("min_lr", f"a float <= lr={self.lr}")
        if not is_number(self.eps) or self.eps <= 0:
            fail("eps", "a positive float")
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in self.betas)):
            fail("betas", "two floats in [0, 1), e.g. [0.9, 0.95]")
        for name in ("max_steps", "grad_accum_steps", "log_every", "eval_batches"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a non-negative integer")
        if self.max_grad_norm is not None and (not is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            fail("max_grad_norm", "a positive float, or None for no clipping")
        if self.keep_last is not None and (not is_int(self.keep_last) or self.keep_last < 1):
            fail("keep_last", "a positive integer, or None to keep every checkpoint")
        if not (isinstance(self.resume, bool) or (isinstance(self.resume, (str, Path)) and str(self.resume))):
            fail("resume", "False, True, 'auto', or the path of a checkpoint directory")
        for name in ("tensorboard", "progress", "plot", "compile", "fused_optimizer", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")

    @property
    def resume_mode(self) -> Optional[str]:
        """None (fresh start), "auto" (latest checkpoint in out_dir, if any) or a path."""
        if self.resume is False:
            return None
        if self.resume is True or str(self.resume) == "auto":
            return "auto"
        return str(self.resume)

    # -- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["betas"] = list(self.betas)
        if isinstance(self.resume, Path):
            data["resume"] = str(self.resume)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"TrainConfig has no field {key!r}{hint}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
