"""Run metrics: JSONL + TensorBoard (`RunLogger`), a progress bar, a loss plot.

metrics.jsonl is the record of truth, appended and flushed a line at a time: a resumed run continues the
same file; a crash loses at most the line being written. Non-finite values are written as the strings
"nan", "inf", "-inf" (bare NaN is not valid JSON; null would lose inf's sign); `read_metrics` restores them."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Optional, Union

from tqdm import tqdm

PathLike = Union[str, Path]
RESERVED = ("step", "split", "time")
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _to_float(name: str, value: Any) -> float:
    """A number, a one-element tensor or a numpy scalar -> float (`.item()` syncs a GPU tensor)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {name!r}: expected a number, got the string {value!r}")
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a tensor of several elements
        shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
        raise TypeError(f"metric {name!r}: expected a number, a one-element tensor or a numpy scalar, "
                        f"got {type(value).__name__}{shape}") from e


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-write), so appended lines start on a line of their own."""
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


class RunLogger:
    """Metrics of one run: a JSONL file (one JSON object per line: {"step", "split", "time", **metrics})
    and TensorBoard event files (scalars tagged f"{split}/{name}") in out_dir.

    enabled=False (non-zero ranks under torchrun): every method is a no-op and no file is made, so callers
    need no rank checks. Tensors go through `.item()`, which waits for the GPU: log every N steps."""

    def __init__(self, out_dir: PathLike, *, tensorboard: bool = True, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self._file, self._writer = None, None  # None when disabled or closed
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("RunLogger(tensorboard=True) needs the `tensorboard` package: "
                                  "pip install tensorboard (or pass tensorboard=False)") from e
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.jsonl_path)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        """Append one line {"step", "split", "time", **metrics} and one TensorBoard scalar per metric."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"RunLogger({self.out_dir}): log() called after close()")
        if isinstance(step, bool) or not hasattr(step, "__index__") or not isinstance(split, str) or not split:
            raise TypeError(f"log(step={step!r}, split={split!r}): expected an int step and a non-empty split")
        if any(not isinstance(n, str) or not n or n in RESERVED for n in metrics):
            raise ValueError(f"metric names {list(metrics)}: expected non-empty strings other than {RESERVED}")
        values = {name: _to_float(name, value) for name, value in metrics.items()}
        step, now = int(step), time.time()
        encoded = {k: v if math.isfinite(v) else str(v) for k, v in values.items()}  # "nan", "inf", "-inf"
        self._file.write(json.dumps({"step": step, "split": split, "time": round(now, 3), **encoded},
                                    allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, v in values.items():
                self._writer.add_scalar(f"{split}/{name}", v, global_step=step, walltime=now)

    def close(self) -> None:
        """Flush and close both files; calling it twice is fine."""
        for f in (self._file, self._writer):
            if f is not None:
                f.close()
        self._file = self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> str:
    """Compact: 2.314, 3.0e-04, 12.3k."""
    if isinstance(v, str):
        return v
    v = _to_float("field", v)
    a = abs(v)
    if not math.isfinite(v) or a == 0:
        return f"{v:g}"
    if a < 1e-2:
        return f"{v:.1e}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if a >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.4g}"


class ProgressBar:
    """tqdm bar over optimizer steps showing loss, lr, tok/s.
    Off when enabled=False (non-zero ranks) or LLMKIT_NO_PROGRESS=1 (CI logs, piped output). Fields
    are stored without a forced redraw, so the bar redraws at most every tqdm mininterval (0.1 s).
    A field named `tok_per_s` shows as `tok/s`; `**{"tok/s": x}` works too."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train",
                 *, file: Optional[IO[str]] = None):
        off = not enabled or os.environ.get("LLMKIT_NO_PROGRESS", "0") not in ("", "0")
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         file=file if file is not None else sys.stderr, disable=off)

    def update(self, step: int, **fields: Any) -> None:
        """Move the bar to `step` (absolute, not an increment) and show `fields`."""
        if self._bar.disable:  # skip formatting too: a tensor field's .item() would wait for the GPU
            return
        if fields:
            text = ", ".join(f"{k.replace('_per_', '/')}={_fmt(v)}" for k, v in fields.items())
            self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def read_metrics(jsonl_path: PathLike) -> list[dict]:
    """All records of a metrics.jsonl, in file order; "nan"/"inf"/"-inf" strings become floats.
    An unterminated last line (a crash mid-write) is skipped; any other bad line is an error."""
    lines, records = Path(jsonl_path).read_text(encoding="utf-8").split("\n"), []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: a torn write
                break
            raise ValueError(f"{jsonl_path}:{i}: not valid JSON ({e.msg}): {line[:80]!r}") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{jsonl_path}:{i}: expected a JSON object, got {type(rec).__name__}")
        records.append({k: NON_FINITE.get(v, v) if k not in RESERVED and isinstance(v, str) else v
                        for k, v in rec.items()})
    return records


def _losses(records: list[dict], split: str) -> tuple[list[int], list[float]]:
    """(steps, losses) of one split; a step logged twice (a resumed run redoing steps) keeps the last."""
    by_step = {r["step"]: float(r["loss"]) for r in records
               if r.get("split") == split and isinstance(r.get("loss"), (int, float))}
    return sorted(by_step), [by_step[s] for s in sorted(by_step)]


def plot_losses(jsonl_path: PathLike, png_path: PathLike, title: Optional[str] = None) -> Path:
    """PNG of train loss (and val loss, with markers, if logged) against step; written atomically.
    A bare Figure on an Agg canvas: no display, no pyplot global state, no backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    jsonl_path, png_path = Path(jsonl_path), Path(png_path)
    records = read_metrics(jsonl_path)
    train, val = _losses(records, "train"), _losses(records, "val")
    if not any(math.isfinite(v) for v in train[1] + val[1]):
        raise ValueError(f"{jsonl_path}: no finite 'loss' in the 'train' or 'val' split "
                         f"({len(records)} records); nothing to plot")
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = FigureCanvasAgg(fig).figure.add_subplot()
    if train[0]:
        ax.plot(*train, label="train", linewidth=1.2)
    if val[0]:
        ax.plot(*val, label="val", marker="o", markersize=4, linewidth=1.2)
    ax.set(xlabel="step", ylabel="loss", title=f"loss: {jsonl_path.parent.name}" if title is None else title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    finally:
        tmp.unlink(missing_ok=True)
    return png_path
