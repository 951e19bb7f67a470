"""Batches for causal-LM training: the Trainer's data contract.

Every loader here is an iterator of dict batches

    {"input_ids": (b, T) int64, "targets": (b, T) int64}         targets[i, t] = the token after input_ids[i, t]
    + {"position_ids": (b, T), "doc_ids": (b, T)}                  with reset_positions_at_eos=True

"targets" are already shifted (every position predicts the next token, nanoGPT-style), unlike
Hugging Face's "labels", which are aligned with input_ids and shifted inside the loss; the two
names keep the conventions apart (`llmkit.objectives.clm_loss` accepts either).

with `state_dict()` / `load_state_dict(state)` holding plain ints, so a resumed run continues with
exactly the batches an uninterrupted run would have seen, and `rank` / `world_size` arguments: each
step draws one GLOBAL batch of `batch_size` rows, and rank r keeps rows r, r + world_size, ... of it
(`batch_size // world_size` rows). So N ranks together see exactly the single-process batch, and a
state saved under one world size resumes under another.

Document boundaries: corpora are packed with an EOS after each document, so a window can span two
documents. With `reset_positions_at_eos=True` (needs `eos_token_id`) each batch also carries
`position_ids`, which restart at 0 on the token after every EOS (and at the start of each row), and
`doc_ids`, the index of the document segment within the row (0, 1, ...). Position embeddings then
never see a cross-document offset; an attention mask that only lets a token attend to earlier tokens
with the same doc_id stops attention crossing documents (built by the model side, not here).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .epochs import EpochBatches
from .errors import DataError

__all__ = ["RandomWindowBatches", "PackedBatches", "MixedBatches", "as_token_array", "make_batch"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


def check_layout(batch_size: int, block_size: int, rank: int, world_size: int, seed: int = 0) -> None:
    _check_int("batch_size", batch_size, 1)
    _check_int("block_size", block_size, 1)
    _check_int("world_size", world_size, 1)
    _check_int("seed", seed, 0)
    if _check_int("rank", rank, 0) >= world_size:
        raise DataError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    if batch_size % world_size:
        raise DataError(f"batch_size={batch_size} is the GLOBAL batch and must be divisible by "
                        f"world_size={world_size} (each rank takes batch_size // world_size rows)")


def as_token_array(tokens: Any):
    """A 1-D token sequence with len() and slicing: numpy arrays, memmaps and ShardedTokens pass
    through untouched (never loaded into memory); torch tensors and lists become numpy arrays."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    elif isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens, dtype=np.int64)
    if not (hasattr(tokens, "__len__") and hasattr(tokens, "__getitem__")):
        raise DataError(f"tokens: expected a 1-D token array (numpy, memmap, ShardedTokens, tensor or list), "
                        f"got {type(tokens).__name__}")
    if len(getattr(tokens, "shape", (0,))) != 1:
        raise DataError(f"tokens: expected a 1-D array, got shape {tuple(tokens.shape)}")
    return tokens


def make_batch(windows: np.ndarray, eos_token_id: int | None = None, reset_positions_at_eos: bool = False) -> dict:
    """(b, T+1) token windows -> the batch dict (see the module docstring)."""
    windows = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    x = windows[:, :-1]  # (b, T)
    batch = {"input_ids": x.contiguous(), "targets": windows[:, 1:].contiguous()}
    if reset_positions_at_eos:
        b, T = x.shape
        starts = torch.zeros((b, T), dtype=torch.bool)  # (b, T): a new document starts here
        starts[:, 0] = True
        starts[:, 1:] = x[:, :-1] == eos_token_id
        idx = torch.arange(T).expand(b, T)  # (b, T)
        start_of_segment = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        batch["position_ids"] = idx - start_of_segment  # (b, T)
        batch["doc_ids"] = torch.cumsum(starts.long(), dim=1) - 1  # (b, T)
    return batch


def _gather(tokens, starts: np.ndarray, width: int) -> np.ndarray:
    """(len(starts), width) int64 windows tokens[s:s+width]."""
    starts = np.asarray(starts, dtype=np.int64)
    if isinstance(tokens, np.ndarray):  # memmaps included: one fancy-indexed read
        return tokens[starts[:, None] + np.arange(width)].astype(np.int64)
    out = np.empty((len(starts), width), dtype=np.int64)
    for i, s in enumerate(starts):
        out[i] = tokens[int(s):int(s) + width]
    return out


class _Batches:
    """Shared bookkeeping: layout checks, rank slicing, state checks."""
    _config_keys: tuple[str, ...] = ()

    def _setup(self, batch_size, block_size, seed, rank, world_size, reset_positions_at_eos, eos_token_id):
        check_layout(batch_size, block_size, rank, world_size, seed)
        if reset_positions_at_eos and eos_token_id is None:
            raise DataError("reset_positions_at_eos=True needs eos_token_id (the id that ends each document)")
        self.batch_size, self.block_size, self.seed = int(batch_size), int(block_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.tokens_per_batch = self.batch_size * self.block_size  # global: all ranks together
        self.local_tokens_per_batch = self.local_batch_size * self.block_size
        self.eos_token_id, self.reset_positions_at_eos = eos_token_id, reset_positions_at_eos

    def _batch(self, windows: np.ndarray) -> dict:
        return make_batch(windows[self.rank::self.world_size], self.eos_token_id, self.reset_positions_at_eos)

    def __iter__(self):
        return self

    def _config(self) -> dict:
        return {k: getattr(self, k) for k in self._config_keys}

    def _check_state(self, state: dict, keys: tuple[str, ...]) -> None:
        name = type(self).__name__
        if not isinstance(state, dict) or state.get("type") != name:
            got = state.get("type") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"load_state_dict: expected a {name} state, got {got!r}")
        for key in keys:
            if key not in state:
                raise DataError(f"load_state_dict: {name} state is missing {key!r}")
        for key, value in self._config().items():
            if key in state and state[key] != value:
                raise DataError(f"load_state_dict: the state was saved with {key}={state[key]!r} but this "
                                f"{name} has {key}={value!r}; resuming would not continue the same batches")


class StepBatches(_Batches):
    """Batches that are a pure function of the step number: a subclass defines `batch_at(step)` and
    sets `self.step = 0`; iterating, the state ({"step": s} plus the config) and resuming follow."""

    def __next__(self) -> dict:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "step": self.step, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("step",))
        self.step = _check_int("state['step']", state["step"], 0)


class WrappedBatches(StepBatches):
    """Batches made from an inner window loader (`self.windows`): step s turns the inner loader's
    next batch into batch s with `_make(raw, s)`; the state adds the inner loader's own."""

    def __next__(self) -> dict:
        batch = self._make(next(self.windows), self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int) -> dict:
        """Batch `step` without moving the state (random windows only): fixed validation batches."""
        if not hasattr(self.windows, "batch_at"):
            raise DataError("batch_at(step) needs sampling='random' (packed epochs have no random access)")
        return self._make(self.windows.batch_at(step), step)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "windows": self.windows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.windows.load_state_dict(state["windows"])


class RandomWindowBatches(StepBatches):
    """nanoGPT-style random windows, endless: step s draws `batch_size` offsets uniformly from
    [0, len(tokens) - block_size) with a generator seeded by (seed, s), so every step's batch is a
    pure function of the step number and the state is just {"step": s}. Rank r keeps rows r::world_size."""
    _config_keys = ("seed", "batch_size", "block_size")

    def __init__(self, tokens, batch_size: int, block_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, reset_positions_at_eos: bool = False, eos_token_id: int | None = None):
        self._setup(batch_size, block_size, seed, rank, world_size, reset_positions_at_eos, eos_token_id)
        self.tokens = as_token_array(tokens)
        if len(self.tokens) < self.block_size + 1:
            raise DataError(f"block_size={block_size} needs at least {block_size + 1} tokens (inputs plus the "
                            f"next-token label), but the data has {len(self.tokens)}")
        self.step = 0

    def offsets(self, step: int) -> np.ndarray:
        """The global batch's window starts at `step` (all ranks)."""
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def batch_at(self, step: int) -> dict:
        return self._batch(_gather(self.tokens, self.offsets(step), self.block_size + 1))


class PackedBatches(_Batches, EpochBatches):
    """Epochs over consecutive blocks: block i is tokens[i*T : i*T + T + 1] (T = block_size), so
    neighbouring blocks share one token and every token after the first is a label exactly once per
    epoch. The epochs are llmkit.data.epochs' (an order shuffled by (seed, epoch), or in order with
    shuffle=False; each step takes the next `batch_size` blocks); `iter_once()` gives one pass.

    drop_last=True skips the epoch's final partial batch; with drop_last=False it is yielded, and
    under world_size > 1 its rows are split r::world_size, so a rank may get fewer rows (even none,
    a (0, T) batch) while every rank still yields the same number of batches.
    State: {"epoch", "position"}, position = blocks already used in this epoch (all ranks).
    """
    _config_keys = ("seed", "batch_size", "block_size", "shuffle", "drop_last", "num_blocks")

    def __init__(self, tokens, batch_size: int, block_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, reset_positions_at_eos: bool = False,
                 eos_token_id: int | None = None):
        self._setup(batch_size, block_size, seed, rank, world_size, reset_positions_at_eos, eos_token_id)
        self.tokens = as_token_array(tokens)
        self.num_blocks = max(len(self.tokens) - 1, 0) // self.block_size
        if self.num_blocks == 0:
            raise DataError(f"block_size={block_size} needs at least {block_size + 1} tokens (inputs plus the "
                            f"next-token label), but the data has {len(self.tokens)}")
        if drop_last and self.num_blocks < self.batch_size:
            raise DataError(f"the data holds {self.num_blocks} blocks of block_size={block_size}, fewer than "
                            f"batch_size={batch_size}: no full batch; lower batch_size or block_size, or pass "
                            "drop_last=False")
        EpochBatches.__init__(self, range(self.num_blocks), self.batch_size, shuffle=bool(shuffle), seed=self.seed,
                              drop_last=bool(drop_last))

    def collate(self, blocks: list) -> dict:
        windows = _gather(self.tokens, np.asarray(blocks, dtype=np.int64) * self.block_size, self.block_size + 1)
        return self._batch(windows)

    def iter_once(self, epoch: int | None = None) -> Iterator[dict]:
        """One full pass over epoch `epoch` (default: the current one), from its start; the
        loader's own state is not touched."""
        order = self._order(self.epoch if epoch is None else epoch)
        for position in range(0, self._end(), self.batch_size):
            yield self.collate(order[position:position + self.batch_size])

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "epoch": self.epoch, "position": self.position, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("epoch", "position"))
        self.epoch = _check_int("state['epoch']", state["epoch"], 0)
        self.position = _check_int("state['position']", state["position"], 0)


class Cycled:
    """A re-iterable (a list of batches) as an endless iterator, its position a plain int."""

    def __init__(self, batches: Iterable):
        self.batches, self.drawn, self._it = batches, 0, iter(batches)

    def __next__(self):
        try:
            item = next(self._it)
        except StopIteration:
            self._it = iter(self.batches)
            item = next(self._it)
        self.drawn += 1
        return item

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self._it, self.drawn = iter(self.batches), 0
        for _ in range(int(state["drawn"])):
            next(self)


class MixedBatches:
    """One batch of each named loader per step, as {name: batch} (re-iterables such as lists are
    cycled); the state is every loader's state, so a resumed run continues each stream exactly."""

    def __init__(self, loaders: dict[str, Any]):
        self.loaders = {name: b if hasattr(b, "__next__") else Cycled(b) for name, b in loaders.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, dict]:
        return {name: next(loader) for name, loader in self.loaders.items()}

    def state_dict(self) -> dict:
        return {name: loader.state_dict() for name, loader in self.loaders.items() if hasattr(loader, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for name, loader_state in state.items():
            self.loaders[name].load_state_dict(loader_state)
