"""Epochs over a list of examples: the one resumable loader base of SFT, classification and
preference batches (token-stream windows live in batches.py).

Epoch e visits the items in an order shuffled by (seed, e) (or in order with shuffle=False); each
step takes the next `batch_size` items and hands them to `collate`. With drop_last every batch is
full (the tail of an epoch is skipped: KTO's batch statistics and gradient accumulation want equal
batches). Iterating is endless (epoch after epoch); `iter_once()` is one pass in the unshuffled
order, for evaluation. The state {"type", "epoch", "position"} holds plain ints, so a resumed run
sees exactly the same batches.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError


class EpochBatches:
    def __init__(self, items, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if not items:
            raise DataError(f"{type(self).__name__}: no examples")
        if drop_last and not 1 <= batch_size <= len(items):
            raise DataError(f"batch_size={batch_size}: expected 1 <= batch_size <= {len(items)} examples")
        self.items, self.batch_size, self.shuffle, self.seed = items, batch_size, shuffle, seed
        self.drop_last = drop_last
        self.epoch, self.position = 0, 0            # position: items of this epoch already served

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.items)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _end(self) -> int:
        """Items an epoch serves."""
        return len(self) * self.batch_size if self.drop_last else len(self.items)

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_cached", (None,))[0] != epoch:      # one shuffle per epoch, not per batch
            n = len(self.items)
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(n) if self.shuffle else np.arange(n)
            self._cached = (epoch, order)
        return self._cached[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= self._end():
            self.epoch, self.position = self.epoch + 1, 0
        index = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += len(index)
        return self.collate([self.items[i] for i in index])

    def iter_once(self):
        for start in range(0, self._end(), self.batch_size):
            yield self.collate(self.items[start:start + self.batch_size])

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            raise DataError(f"load_state_dict: expected a {type(self).__name__} state, got {state!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
