"""StreamingBatches: causal-LM batches straight from text, for corpora bigger than memory or disk shards.

Texts are tokenized lazily, `encode_chunk` documents at a time, each followed by EOS, and cut into
the same blocks as PackedBatches(shuffle=False) over the concatenated token stream: block i is
tokens[i*T : i*T + T + 1], consecutive blocks sharing one token. Only the current chunk and one
block's remainder are ever held, never the corpus or its token list. Each step takes the next
`batch_size` blocks (the global batch) and rank r keeps blocks r, r + world_size, ... of it.

Epochs: when the texts run out, the final partial batch is dropped and the next epoch calls
`texts_factory()` again, which must return a FRESH iterator each time (a function such as
`lambda: iter_texts(paths)`, not an iterator). Order is the source's order: shuffle the corpus
beforehand (or in the factory) if it needs shuffling.

Resume: the state is {"epoch", "blocks_consumed"}. `load_state_dict` restarts the stream of that epoch
and skips the consumed blocks, which re-reads and re-tokenizes the skipped part (cost proportional to
the position; the batches that follow are exactly those of an uninterrupted run). All ranks read and
tokenize the whole stream and keep their own rows, so every rank agrees on block boundaries.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .batches import _Batches, _check_int
from .errors import DataError
from .sources import _iter_strings, iter_texts

__all__ = ["StreamingBatches"]


class StreamingBatches(_Batches):
    """See the module docstring. `texts_factory` is a zero-argument callable returning an iterable of
    strings; anything `iter_texts` accepts (a path, a list of paths or strings) is wrapped as
    `lambda: iter_texts(source, text_field=..., split_lines=...)`."""
    _config_keys = ("batch_size", "block_size", "append_eos")

    def __init__(self, texts_factory: Callable[[], Iterable[str]] | Any, tokenizer: Any, batch_size: int,
                 block_size: int, *, rank: int = 0, world_size: int = 1, append_eos: bool = True,
                 reset_positions_at_eos: bool = False, text_field: str = "text", split_lines: bool | str = False,
                 encode_chunk: int = 64):
        eos = getattr(tokenizer, "eos_token_id", None)
        self._setup(batch_size, block_size, 0, rank, world_size, reset_positions_at_eos, eos)
        if append_eos and eos is None:
            raise DataError("append_eos=True but the tokenizer has no eos_token; give it one or pass append_eos=False")
        if not callable(texts_factory):
            source = texts_factory
            if isinstance(source, Iterator):
                raise DataError("texts_factory: got an iterator, which can be read only once; pass a function "
                                "returning a fresh iterator, e.g. lambda: iter_texts(paths)")
            iter_texts(source, text_field=text_field, split_lines=split_lines)  # check paths/type now
            texts_factory = lambda: iter_texts(source, text_field=text_field, split_lines=split_lines)  # noqa: E731
        self.texts_factory, self.tokenizer = texts_factory, tokenizer
        self.append_eos = bool(append_eos)
        self.encode_chunk = _check_int("encode_chunk", encode_chunk, 1)
        self.epoch, self.blocks_consumed = 0, 0
        self._stream: Iterator[list[np.ndarray]] | None = None

    # ---- the token stream -------------------------------------------------------------------
    def _texts(self) -> Iterator[str]:
        texts = self.texts_factory()
        if isinstance(texts, str) or not isinstance(texts, Iterable):
            raise DataError(f"texts_factory() must return an iterable of strings, got {type(texts).__name__}")
        yield from _iter_strings(texts, "texts_factory()")

    def blocks(self) -> Iterator[np.ndarray]:
        """All blocks of one pass, in order: int64 arrays of block_size + 1 tokens."""
        T = self.block_size
        eos = [self.eos_token_id] if self.append_eos else []
        texts = self._texts()
        rest = np.empty(0, dtype=np.int64)  # tokens not yet emitted (< T + 1 of them between chunks)
        while chunk := list(itertools.islice(texts, self.encode_chunk)):
            encoded = self.tokenizer.encode_batch(chunk, add_special_tokens=False)
            rest = np.concatenate([rest] + [np.asarray(ids + eos, dtype=np.int64) for ids in encoded])
            n = (len(rest) - 1) // T  # complete blocks available
            for i in range(n):
                yield rest[i * T:i * T + T + 1]
            rest = rest[n * T:].copy()  # the last emitted block's final token starts the next block

    def _global_batches(self, skip: int) -> Iterator[list[np.ndarray]]:
        blocks = itertools.islice(self.blocks(), skip, None)
        while len(batch := list(itertools.islice(blocks, self.batch_size))) == self.batch_size:
            yield batch

    # ---- iteration --------------------------------------------------------------------------
    def __next__(self) -> dict:
        if self._stream is None:
            self._stream = self._global_batches(self.blocks_consumed)
        batch = next(self._stream, None)
        if batch is None:  # end of this epoch's texts: start the next pass
            had_batches = self.blocks_consumed > 0
            self.epoch, self.blocks_consumed = self.epoch + 1, 0
            self._stream = self._global_batches(0)
            batch = next(self._stream, None)
            if batch is None:
                raise DataError(
                    f"StreamingBatches: a pass over the texts yields no full batch of batch_size={self.batch_size} "
                    f"blocks of block_size={self.block_size}" + (
                        "; texts_factory() returned an exhausted iterator: it must return a fresh one each call"
                        if had_batches else "; the corpus is too small (or empty) for this batch and block size"))
        self.blocks_consumed += self.batch_size
        return self._batch(np.stack(batch))

    def iter_once(self) -> Iterator[dict]:
        """One pass over the texts from the start (full batches only); the loader's state is untouched."""
        for batch in self._global_batches(0):
            yield self._batch(np.stack(batch))

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, "epoch": self.epoch, "blocks_consumed": self.blocks_consumed,
                **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the next batch re-streams this epoch and skips `blocks_consumed` blocks."""
        self._check_state(state, ("epoch", "blocks_consumed"))
        self.epoch = _check_int("state['epoch']", state["epoch"], 0)
        self.blocks_consumed = _check_int("state['blocks_consumed']", state["blocks_consumed"], 0)
        self._stream = None
