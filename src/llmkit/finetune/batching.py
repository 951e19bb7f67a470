"""Epochs over a list of encoded examples: the loader both SFT and classification batches share.

Epoch e visits the items in an order shuffled by (seed, e) (or in order with shuffle=False); each
step takes the next `batch_size` items and hands them to `collate`. Iterating is endless (epoch
after epoch); `iter_once()` is one pass in the unshuffled order, for evaluation. The state
{"type", "epoch", "position"} holds plain ints, so a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import numpy as np

from ..data.errors import DataError


class EpochBatches:
    def __init__(self, items: list, batch_size: int, *, shuffle: bool = True, seed: int = 0):
        if not items:
            raise DataError(f"{type(self).__name__}: no examples")
        self.items, self.batch_size, self.shuffle, self.seed = items, batch_size, shuffle, seed
        self.epoch, self.position = 0, 0

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.items) // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= len(self.items):
            self.epoch, self.position = self.epoch + 1, 0
        index = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += len(index)
        return self.collate([self.items[i] for i in index])

    def iter_once(self):
        for start in range(0, len(self.items), self.batch_size):
            yield self.collate(self.items[start:start + self.batch_size])

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            raise DataError(f"load_state_dict: expected a {type(self).__name__} state, got {state!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
