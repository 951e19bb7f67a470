"""llmkit.train.logging: metrics.jsonl, TensorBoard scalars, the progress bar and the loss plot."""
from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
import torch

from llmkit.train.logging import ProgressBar, RunLogger, plot_losses, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    monkeypatch.delenv("LLMKIT_NO_PROGRESS", raising=False)  # a CI-wide setting must not hide the bars


def _write(out, rows, tensorboard=False):
    with RunLogger(out, tensorboard=tensorboard) as log:
        for step, metrics, split in rows:
            log.log(step, metrics, split=split)
    return out / "metrics.jsonl"


# ---- JSONL -----------------------------------------------------------------------------------------

def test_jsonl_round_trip_and_line_format(tmp_path):
    path = _write(tmp_path, [(1, {"loss": 2.5, "lr": 3e-4}, "train"), (2, {"loss": 2.25}, "train"),
                             (2, {"loss": 2.75}, "val")])
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert list(first)[:3] == ["step", "split", "time"] and isinstance(first["time"], float)
    recs = read_metrics(path)
    assert [(r["step"], r["split"], r["loss"]) for r in recs] == [(1, "train", 2.5), (2, "train", 2.25),
                                                                 (2, "val", 2.75)]
    assert recs[0]["lr"] == 3e-4


def test_each_line_is_flushed_before_close(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    log.log(1, {"loss": 1.0})
    assert [r["loss"] for r in read_metrics(log.jsonl_path)] == [1.0]  # on disk while still open
    log.close()
    log.close()  # twice is fine
    with pytest.raises(RuntimeError, match="after close"):
        log.log(2, {"loss": 1.0})


def test_resume_appends_to_the_same_file(tmp_path):
    _write(tmp_path, [(1, {"loss": 3.0}, "train"), (2, {"loss": 2.0}, "train")])
    _write(tmp_path, [(3, {"loss": 1.0}, "train")])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_torn_last_line_is_skipped_and_cut_on_resume(tmp_path):
    path = _write(tmp_path, [(1, {"loss": 3.0}, "train")])
    with open(path, "a") as f:
        f.write('{"step": 2, "split": "tr')  # a crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [1]
    _write(tmp_path, [(2, {"loss": 2.0}, "train")])
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\nnot json\n{"step": 2, "split": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_tensors_and_numpy_values_become_floats(tmp_path):
    path = _write(tmp_path, [(np.int64(5), {"loss": torch.tensor(1.5), "acc": np.float32(0.25),
                                            "n": np.int64(7), "g": torch.tensor([0.5]), "k": 3}, "train")])
    rec = json.loads(path.read_text())
    assert rec["step"] == 5 and type(rec["step"]) is int
    assert rec == {**rec, "loss": 1.5, "acc": 0.25, "n": 7.0, "g": 0.5, "k": 3.0}
    assert all(type(rec[k]) is float for k in ("loss", "acc", "n", "g", "k"))


def test_non_finite_values_are_strings_in_the_file_and_floats_when_read(tmp_path):
    path = _write(tmp_path, [(1, {"a": float("nan"), "b": torch.tensor(float("inf")),
                                  "c": np.float64("-inf"), "d": 1.0}, "train")])
    text = path.read_text()
    raw = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSONL"))
    assert (raw["a"], raw["b"], raw["c"], raw["d"]) == ("nan", "inf", "-inf", 1.0)
    rec = read_metrics(path)[0]
    assert math.isnan(rec["a"]) and rec["b"] == math.inf and rec["c"] == -math.inf
    assert rec["split"] == "train"  # reserved fields are never converted


@pytest.mark.parametrize("metrics, match", [
    ({"loss": "2.0"}, "string"), ({"loss": torch.ones(3)}, r"shape \(3,\)"), ({"loss": None}, "NoneType"),
    ({"step": 1.0}, "other than"), ({"": 1.0}, "other than")])
def test_bad_metrics_name_the_field(tmp_path, metrics, match):
    with RunLogger(tmp_path, tensorboard=False) as log, pytest.raises((TypeError, ValueError), match=match):
        log.log(1, metrics)


@pytest.mark.parametrize("step, split", [(1.5, "train"), (True, "train"), (1, ""), (1, None)])
def test_bad_step_or_split(tmp_path, step, split):
    with RunLogger(tmp_path, tensorboard=False) as log, pytest.raises(TypeError, match="expected an int step"):
        log.log(step, {"loss": 1.0}, split=split)


def test_disabled_logger_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with RunLogger(out, enabled=False) as log:
        log.log(1, {"loss": 1.0})
        log.log(2, {"loss": torch.ones(3)})  # not even validated: non-zero ranks pay nothing
    assert log.jsonl_path == out / "metrics.jsonl"
    assert not out.exists()


# ---- TensorBoard -------------------------------------------------------------------------------------

def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write(tmp_path, [(1, {"loss": 2.5, "lr": 1e-3}, "train"), (2, {"loss": 2.0, "lr": 2e-3}, "train"),
                      (2, {"loss": 2.25}, "val")], tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr", "val/loss"]
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert got["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert got["train/lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert got["val/loss"] == [(2, 2.25)]


def test_missing_tensorboard_is_a_clear_error_only_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorboard"):
        RunLogger(tmp_path / "a")
    with RunLogger(tmp_path / "b", tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
    assert not (tmp_path / "b" / "tensorboard").exists()
    RunLogger(tmp_path / "c", enabled=False).close()


# ---- plot ---------------------------------------------------------------------------------------------

def _check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
    assert img.std() > 0  # something was drawn
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # the temporary file was renamed


def test_plot_train_and_val(tmp_path):
    rows = [(s, {"loss": 3.0 / s, "lr": 1e-3}, "train") for s in range(1, 21)]
    rows += [(s, {"loss": 3.2 / s}, "val") for s in (5, 10, 15, 20)]
    rows += [(5, {"loss": float("nan")}, "train")]  # a non-finite value (and a redone step) is not fatal
    path = _write(tmp_path, rows)
    out = plot_losses(path, tmp_path / "plots" / "loss.png", title="tiny run")
    assert out == tmp_path / "plots" / "loss.png"
    _check_png(out)


def test_plot_train_only_and_val_changes_the_picture(tmp_path):
    import matplotlib.image

    train = [(s, {"loss": 1.0 / s}, "train") for s in range(1, 6)]
    only = plot_losses(str(_write(tmp_path / "a", train)), str(tmp_path / "a.png"), title="t")
    both = plot_losses(_write(tmp_path / "b", train + [(5, {"loss": 0.5}, "val")]), tmp_path / "b.png", title="t")
    _check_png(only)
    assert not np.array_equal(matplotlib.image.imread(only), matplotlib.image.imread(both))  # val is drawn


def test_plot_overwrites_atomically(tmp_path):
    path = _write(tmp_path, [(s, {"loss": 1.0 / s}, "train") for s in range(1, 6)])
    png = tmp_path / "loss.png"
    png.write_bytes(b"old")
    _check_png(plot_losses(path, png))


def test_plot_without_losses_is_an_error(tmp_path):
    path = _write(tmp_path, [(1, {"lr": 1e-3}, "train"), (2, {"loss": float("nan")}, "train"),
                             (3, {"acc": 0.5}, "val")])
    with pytest.raises(ValueError, match="no finite 'loss'"):
        plot_losses(path, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


# ---- progress bar ----------------------------------------------------------------------------------

def test_progress_bar_shows_fields_compactly():
    buf = io.StringIO()
    bar = ProgressBar(total=100, initial=10, desc="pretrain", file=buf)
    bar.update(20, loss=torch.tensor(2.31416), lr=3e-4, tok_per_s=12345.0)
    bar.update(50, loss=1.5, lr=3e-4, tok_per_s=1.5e6)
    bar.close()
    text = buf.getvalue()
    assert "pretrain" in text and "50/100" in text
    assert "loss=1.5, lr=3.0e-04, tok/s=1.5M" in text


def test_progress_bar_default_writes_to_stderr(capsys):
    bar = ProgressBar(total=10)
    bar.update(3, loss=2.31416, **{"tok/s": 12345.0})
    bar.close()
    err = capsys.readouterr().err
    assert "3/10" in err and "loss=2.314" in err and "tok/s=12.3k" in err


def test_progress_bar_does_not_redraw_on_every_update():
    buf = io.StringIO()
    bar = ProgressBar(total=1000, file=buf)
    for step in range(1, 1001):
        bar.update(step, loss=1.0 / step)
    bar.close()
    assert buf.getvalue().count("\r") < 100  # tqdm's mininterval, not one redraw per step


@pytest.mark.parametrize("enabled, env", [(False, None), (True, "1")])
def test_progress_bar_off(monkeypatch, enabled, env):
    if env is not None:
        monkeypatch.setenv("LLMKIT_NO_PROGRESS", env)
    buf = io.StringIO()
    bar = ProgressBar(total=10, enabled=enabled, file=buf)
    bar.update(5, loss=torch.ones(3))  # not even formatted when off
    bar.close()
    assert buf.getvalue() == ""
