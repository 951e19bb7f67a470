"""Selecting the best evaluation of a run (train.eval_metric): keep-best and early stopping."""
from __future__ import annotations

from torch import nn

from .config import TrainConfig


class Selection:
    """The best evaluation so far by config.eval_metric (mode max | min | auto: min for loss / ppl),
    its weights (on the CPU, with keep_best) and the count of evaluations since it improved."""

    def __init__(self, config: TrainConfig):
        self.metric, self.keep, self.patience, self.min_delta = (config.eval_metric, config.keep_best,
                                                                 config.patience, config.min_delta)
        self.mode = config.eval_mode if config.eval_mode != "auto" else (
            "min" if self.metric in ("loss", "ppl") else "max")
        self.step = self.value = self.metrics = self.state = None
        self.bad_evals = 0

    def update(self, step: int, metrics: dict, model: nn.Module) -> bool:
        """Record one evaluation; True when patience has run out."""
        if self.metric is None:
            return False
        if self.metric not in metrics:
            raise ValueError(f"TrainConfig.eval_metric={self.metric!r}: the evaluation gives "
                             f"{sorted(scalars(metrics))}")
        value = float(metrics[self.metric])
        sign = 1.0 if self.mode == "max" else -1.0
        if self.value is None or sign * (value - self.value) > self.min_delta:
            self.step, self.value, self.metrics, self.bad_evals = step, value, metrics, 0
            if self.keep:
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def reset(self) -> None:
        """Forget the best so far: the model changed form mid-run (diff pruning swaps its dense
        delta for the kept entries), so earlier snapshots and scores no longer apply."""
        self.step = self.value = self.metrics = self.state = None
        self.bad_evals = 0

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def scalars(metrics: dict) -> dict:
    """The plain-number entries of a metrics dict (what logs and summaries hold)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
