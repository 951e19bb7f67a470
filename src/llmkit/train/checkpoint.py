"""Training checkpoints: safetensors + JSON, written atomically, resumed exactly. No pickle.

Layout of `out_dir/checkpoints/step_{N:07d}/` (the state after optimizer update N):

    model.safetensors      full model state dict; tensors that share storage (tied embeddings)
                           are written once, the other names listed in the metadata "aliases"
    optimizer.safetensors  every optimizer state tensor as "state.{parameter name}.{state name}"
    rng.safetensors        "rank{r}.torch_cpu" (and "rank{r}.cuda{i}") generator states
    trainer_state.json     step, optimizer param_groups and non-tensor state, scheduler state,
                           per-rank data position and python/numpy RNG state, the TrainConfig

Atomicity: everything is written into `step_N.tmp-<pid>/`, which is renamed to `step_N/` with
`os.replace` once complete; then the `latest` pointer file is replaced atomically, and only then
are older checkpoints beyond `keep_last` removed. A process killed at any point leaves the
previous checkpoint complete and `find_latest` ignores the leftovers.

State dicts go through torch.distributed.checkpoint.state_dict (`full_state_dict=True,
cpu_offload=True`): the same code serves a plain module, DDP and FSDP2 (where gathering is a
collective: every rank calls `save_checkpoint`, rank 0 alone writes), and optimizer state is keyed
by parameter name, so a checkpoint from N ranks loads in a single process and the reverse.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..io.errors import CheckpointError
from ..io.safetensors_files import atomic_write_text

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
FORMAT = "llmkit.checkpoint/1"
STEP_DIR = re.compile(r"^step_(\d+)$")
LEFTOVER_DIR = re.compile(r"^step_\d+\.(tmp|old|deleting)-(\d+)$")
FULL_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ---- finding checkpoints ---------------------------------------------------------------------
def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:07d}"


def is_complete(path: str | Path) -> bool:
    """A final-named `step_N` directory holding every file, with a readable trainer_state.json."""
    path = Path(path)
    if not STEP_DIR.match(path.name) or not all((path / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        return isinstance(json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("step"), int)
    except (OSError, ValueError):
        return False


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest step first (temp dirs ignored)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest(out_dir: str | Path) -> Optional[Path]:
    """The checkpoint named by the `latest` pointer if it is complete, else the highest complete
    step; None when there is none. `out_dir` is a run directory (holding checkpoints/)."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(candidate):
            return candidate
    complete = list_checkpoints(out_dir)
    return complete[-1] if complete else None


# ---- RNG state -------------------------------------------------------------------------------
def capture_rng() -> dict:
    """This process's python, numpy, torch (and CUDA) generator states, as JSON-able lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch_cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch_cpu"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- saving ----------------------------------------------------------------------------------
def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, *,
                    extra_state: Optional[dict] = None, rng_states: Optional[list[dict]] = None,
                    keep_last: Optional[int] = None, write: bool = True) -> Path:
    """Save `step_N` atomically and return its path. Under FSDP every rank must call this (gathering
    the full state is a collective) with write=True on rank 0 only. `rng_states`: one
    `capture_rng()` per rank (default: this process's). `extra_state` joins trainer_state.json."""
    model_sd = get_model_state_dict(model, options=FULL_CPU)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL_CPU) if optimizer is not None else None
    final = checkpoint_path(out_dir, step)
    if not write:
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    unique, aliases = _dedupe_shared(model_sd)
    _write_tensors(unique, tmp / MODEL_FILE, {"format": "pt", "aliases": json.dumps(aliases)})
    optim_tensors, optim_json = _flatten_optimizer(optim_sd)
    _write_tensors(optim_tensors, tmp / OPTIMIZER_FILE, {"format": "pt"})
    rng_states = rng_states if rng_states is not None else [capture_rng()]
    rng_tensors = {}
    for rank, rng in enumerate(rng_states):
        rng_tensors[f"rank{rank}.torch_cpu"] = torch.as_tensor(rng["torch_cpu"], dtype=torch.uint8)
        for i, cuda_state in enumerate(rng.get("cuda", [])):
            rng_tensors[f"rank{rank}.cuda{i}"] = torch.as_tensor(cuda_state, dtype=torch.uint8)
    _write_tensors(rng_tensors, tmp / RNG_FILE, {"format": "pt"})
    state = {"format": FORMAT, "step": step, "optimizer": optim_json,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": [{"python": r["python"], "numpy": r["numpy"]} for r in rng_states],
             **(extra_state or {})}
    (tmp / STATE_FILE).write_bytes(json.dumps(state, indent=1).encode("utf-8"))
    _fsync(tmp / STATE_FILE)
    _fsync_dir(tmp)

    if final.exists():                       # a re-run over an older timeline: swap, then delete
        old = root / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    _fsync_dir(root)
    if keep_last is not None:
        _prune(out_dir, step, keep_last)
    return final


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing storage: keep one name per identical view (the others
    become aliases) and copy any other overlapping view."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.numel() == 0:
            unique[name] = tensor.contiguous()
            continue
        ptr = tensor.untyped_storage().data_ptr()
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        if ptr in storages or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        views[view] = name
        storages.add(ptr)
        unique[name] = tensor
    return unique, aliases


def _flatten_optimizer(optim_sd: Optional[dict]) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    if optim_sd is None:
        return {}, None
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, list[str]] = {}
    plain: dict[str, dict] = {}
    for param_name, entries in optim_sd["state"].items():
        for state_name, value in entries.items():
            if isinstance(value, torch.Tensor):
                key = f"state.{param_name}.{state_name}"
                tensors[key] = value.detach().cpu().contiguous()
                keys[key] = [param_name, state_name]
            else:
                plain.setdefault(param_name, {})[state_name] = value
    return tensors, {"param_groups": optim_sd["param_groups"], "state": plain, "tensors": keys}


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: some filesystems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prune(out_dir: str | Path, current_step: int, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest `keep_last` up to `current_step` (renamed
    first, so a crash mid-delete never leaves a half-deleted `step_N` that looks complete)."""
    mine = [p for p in list_checkpoints(out_dir) if int(STEP_DIR.match(p.name).group(1)) <= current_step]
    for path in mine[:-keep_last]:
        doomed = path.with_name(f"{path.name}.deleting-{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temp/old/deleting dirs left by a process that no longer runs."""
    for path in root.iterdir():
        match = LEFTOVER_DIR.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- loading ---------------------------------------------------------------------------------
def read_trainer_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing} "
                              f"(expected {list(REQUIRED_FILES)})")
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: not valid JSON ({exc})") from exc
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path / STATE_FILE}: key 'format': expected {FORMAT!r}, "
                              f"found {state.get('format')!r}")
    return state


def load_model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint, aliases (tied weights) expanded."""
    file = Path(path) / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, *, strict: bool = True) -> dict:
    """Load weights (and optimizer and scheduler state, when given) into place; return the
    trainer_state dict with "rng" holding each rank's full generator state for `restore_rng`.
    The model may be plain, DDP-wrapped or FSDP2-sharded (every rank then calls this)."""
    path = Path(path)
    state = read_trainer_state(path)
    tensors = load_model_tensors(path)
    try:
        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=strict))
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path / MODEL_FILE}: does not match the model ({exc})") from exc
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"{path}: holds no optimizer state (saved without an optimizer)")
        saved = _unflatten_optimizer(path, state["optimizer"])
        if len(saved["param_groups"]) != len(optimizer.param_groups):
            raise CheckpointError(f"{path / STATE_FILE}: {len(saved['param_groups'])} optimizer param groups "
                                  f"saved, the optimizer has {len(optimizer.param_groups)}: expected the same")
        for current, stored in zip(optimizer.param_groups, saved["param_groups"]):
            for key in set(current) | set(stored):   # keys only one side has (a scheduler's initial_lr)
                if key != "params":
                    current.setdefault(key, stored.get(key))
                    stored.setdefault(key, current[key])
        try:
            set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not match the optimizer (expected the same "
                                  f"parameters and param groups as when saved; {type(exc).__name__}: {exc})") from exc
        for group in optimizer.param_groups:  # JSON (and DCP) turn tuples, e.g. Adam's betas, into lists
            group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_tensors = load_file(str(path / RNG_FILE))
    for rank, rng in enumerate(state.get("rng", [])):
        rng["torch_cpu"] = rng_tensors[f"rank{rank}.torch_cpu"].tolist()
        cuda = sorted((k for k in rng_tensors if k.startswith(f"rank{rank}.cuda")),
                      key=lambda k: int(k.rsplit("cuda", 1)[1]))
        if cuda:
            rng["cuda"] = [rng_tensors[k].tolist() for k in cuda]
    return state


def _unflatten_optimizer(path: Path, saved: dict) -> dict:
    tensors = load_file(str(path / OPTIMIZER_FILE))
    state: dict[str, dict] = {name: dict(values) for name, values in saved["state"].items()}
    for key, (param_name, state_name) in saved["tensors"].items():
        if key not in tensors:
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: tensor {key!r} listed in {STATE_FILE} is missing")
        state.setdefault(param_name, {})[state_name] = tensors[key]
    return {"state": state, "param_groups": [dict(group) for group in saved["param_groups"]]}
