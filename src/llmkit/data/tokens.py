"""Token files: ShardWriter writes flat shards atomically; ShardedTokens reads them back as one 1-D array."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["ShardedTokens", "ShardWriter", "token_dtype"]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


class ShardedTokens:
    """Several memmapped shard files seen as one read-only 1-D token array.

    Supports len(), integer indexing and slicing (a slice that crosses a shard boundary is copied
    out of both files; one inside a shard is a memmap view). Pickles as its file list, so
    DataLoader workers reopen the files instead of copying the tokens.
    """

    def __init__(self, paths: list[str | os.PathLike], dtype: str | np.dtype):
        self.paths = [Path(p) for p in paths]
        self.dtype = np.dtype(dtype)
        self._open()

    def _open(self) -> None:
        self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])

    def __getstate__(self):
        return {"paths": self.paths, "dtype": self.dtype.str}

    def __setstate__(self, state):
        self.paths, self.dtype = state["paths"], np.dtype(state["dtype"])
        self._open()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self[start:stop][::step] if start < stop else np.empty(0, self.dtype)
            if stop <= start:
                return np.empty(0, self.dtype)
            first = int(np.searchsorted(self._starts, start, side="right")) - 1
            last = int(np.searchsorted(self._starts, stop - 1, side="right")) - 1
            if first == last:
                base = self._starts[first]
                return self._maps[first][start - base:stop - base]
            pieces = []
            for s in range(first, last + 1):
                base = self._starts[s]
                pieces.append(self._maps[s][max(start - base, 0):min(stop - base, len(self._maps[s]))])
            return np.concatenate(pieces)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {index} out of range for {n} tokens")
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._maps[s][i - self._starts[s]]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[0:len(self)], dtype=dtype)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens, {len(self.paths)} files, dtype={self.dtype})"


class ShardWriter:
    """Appends tokens to `{split}_{i:05d}.bin`, rolling over every `shard_tokens`; atomic per file."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.total = 0
        self._f = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None:
                self._name = f"{self.split}_{len(self.files):05d}.bin"
                self._tmp = self.out_dir / f".{self._name}.{os.getpid()}.tmp"
                self._f = open(self._tmp, "wb")
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            tokens[:take].tofile(self._f)
            self._in_shard += take
            self.total += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.out_dir / self._name)
        self.files.append({"name": self._name, "tokens": self._in_shard})
        self._f, self._in_shard = None, 0

    def close(self) -> None:
        if self._f is not None:
            self._finish()

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._tmp.unlink(missing_ok=True)
            self._f = None
