"""Tokenized shards: a corpus tokenized once into flat numpy memmap files, split into train and val.

Layout of `out_dir` (what `build_shards` writes and `load_shards` reads):

    train_00000.bin, train_00001.bin, ...   flat token ids, `shard_tokens` per file (the last one shorter)
    val_00000.bin, ...                      the same for the validation split
    meta.json                               dtype, vocab_size, eos id, token/document counts, files,
                                            tokenizer hash, source description, build settings

Token ids are uint16 when the vocabulary has fewer than 65,536 entries (as nanoGPT stores GPT-2 ids),
else uint32. Each document is followed by the EOS token (`append_eos=True`), so packed windows see
document boundaries.

The train/val split is by document: a seeded draw sends round(val_fraction * n_docs) documents to val
(at least one, and never all), decided per group of 1,024 documents so the corpus streams through.
A corpus of a single document (tinyshakespeare.txt) is split by contiguous token range instead,
first `1 - val_fraction` of its tokens to train and the rest to val, exactly as nanoGPT's
`shakespeare_char/prepare.py` does; the document's EOS then ends the val part.

Writes are atomic: each shard goes to a temporary name and is renamed when complete, and meta.json
is written last. A build interrupted at any point therefore leaves no meta.json; the next
`build_shards` call sees that and rebuilds. Under torchrun, build on rank 0 only and let the other
ranks wait at a barrier before `load_shards` (concurrent builds into one folder would collide). A
complete build whose settings, tokenizer and source (paths, sizes, mtimes; or list contents) are
unchanged is reused instead of rebuilt.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DataError
from .sources import describe_source, iter_texts, source_fingerprint
from .tokens import ShardedTokens, ShardWriter, token_dtype

__all__ = ["build_shards", "load_shards", "ShardInfo", "ShardedTokens", "token_dtype"]

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000  # nanoGPT/fineweb uses 1e8 tokens per shard (200 MB at uint16)
GROUP_DOCS = 1024  # documents assigned to train/val together; bounds memory
SPLITS = ("train", "val")
META_FILE = "meta.json"


@dataclass
class ShardInfo:
    """What a build produced (the parsed meta.json). `reused` is True when an existing build was kept."""
    out_dir: Path
    dtype: str
    vocab_size: int
    eos_token_id: int | None
    train_tokens: int
    val_tokens: int
    train_files: list[str]
    val_files: list[str]
    documents: dict[str, int]
    split_method: str  # "documents" or "contiguous"
    source: str
    tokenizer_hash: str | None
    reused: bool = False
    meta: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_meta(cls, out_dir: Path, meta: dict, reused: bool = False) -> "ShardInfo":
        return cls(out_dir=Path(out_dir), dtype=meta["dtype"], vocab_size=meta["vocab_size"],
                   eos_token_id=meta["eos_token_id"], train_tokens=meta["tokens"]["train"],
                   val_tokens=meta["tokens"]["val"], train_files=[f["name"] for f in meta["files"]["train"]],
                   val_files=[f["name"] for f in meta["files"]["val"]], documents=meta["documents"],
                   split_method=meta["split_method"], source=meta["source"],
                   tokenizer_hash=meta["tokenizer_hash"], reused=reused, meta=meta)


# ---- building ------------------------------------------------------------------------------
def _tokenizer_hash(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "to_str"):
        return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    return None


def _tokenized(docs: Iterator[str], tokenizer: Any, vocab_size: int, chunk: int = 256) -> Iterator[np.ndarray]:
    """Documents as int64 arrays (no special tokens), encoded `chunk` at a time (parallel in Rust)."""
    while batch := list(itertools.islice(docs, chunk)):
        encoded = (tokenizer.encode_batch(batch, add_special_tokens=False) if hasattr(tokenizer, "encode_batch")
                   else [tokenizer.encode(t, add_special_tokens=False) for t in batch])
        for ids in encoded:
            arr = np.asarray(ids, dtype=np.int64)
            if len(arr) and (arr.max() >= vocab_size or arr.min() < 0):
                raise DataError(f"tokenizer produced id {int(arr.max())} outside its vocab_size {vocab_size}")
            yield arr


def _read_meta(out_dir: Path) -> dict:
    path = out_dir / META_FILE
    if not path.is_file():
        raise DataError(f"no meta.json in '{out_dir}': the shards were never built there or their build was "
                        "interrupted; run build_shards(...) to (re)build them")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"'{path}' is not valid JSON ({err}); rebuild with build_shards(..., overwrite=True)") from err


def _bad_shard(out_dir: Path, meta: dict, split: str) -> dict | None:
    """The first shard of `split` that is missing or whose size differs from meta.json, else None."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for f in meta["files"][split]:
        p = out_dir / f["name"]
        if not p.is_file() or p.stat().st_size != f["tokens"] * itemsize:
            return f
    return None


def _clear(out_dir: Path) -> None:
    (out_dir / META_FILE).unlink(missing_ok=True)  # first: from here on the directory reads as incomplete
    for p in out_dir.iterdir():
        if p.is_file() and (p.name.endswith(".tmp") or (p.suffix == ".bin" and p.name.split("_")[0] in SPLITS)):
            p.unlink()


def build_shards(texts: Any, tokenizer: Any, out_dir: str | os.PathLike, *, val_fraction: float = 0.1,
                 append_eos: bool = True, shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0,
                 text_field: str = "text", split_lines: bool | str = False, overwrite: bool = False) -> ShardInfo:
    """Tokenize `texts` (anything `iter_texts` accepts) into train/val shards in `out_dir`.

    Returns the ShardInfo of the build; an unchanged complete build is reused unless overwrite=True.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction!r}: expected a number in [0, 1)")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens!r}: expected a positive int")
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos is None:
        raise DataError("append_eos=True but the tokenizer has no eos_token; give it one or pass append_eos=False")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    settings = {"val_fraction": val_fraction, "append_eos": append_eos, "shard_tokens": shard_tokens, "seed": seed}
    tok_hash = _tokenizer_hash(tokenizer)
    src_fp = source_fingerprint(texts, text_field, split_lines)
    fingerprint = None
    if src_fp is not None and tok_hash is not None:
        fingerprint = hashlib.sha256(json.dumps([FORMAT_VERSION, settings, tok_hash, src_fp]).encode()).hexdigest()
    if not overwrite and fingerprint is not None and (out_dir / META_FILE).is_file():
        try:
            meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
            if meta.get("fingerprint") == fingerprint and not any(_bad_shard(out_dir, meta, s) for s in SPLITS):
                return ShardInfo.from_meta(out_dir, meta, reused=True)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # unreadable: rebuild
    _clear(out_dir)

    source = describe_source(texts)
    docs = _tokenized(iter_texts(texts, text_field=text_field, split_lines=split_lines), tokenizer, vocab_size)
    writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    eos_arr = np.asarray([eos] if append_eos else [], dtype=np.int64)
    counts = {"train": 0, "val": 0}
    try:
        first = next(docs, None)
        if first is None:
            raise DataError(f"empty corpus: {source} yielded no non-empty documents")
        second = next(docs, None)
        if second is None:  # one document: contiguous split, as nanoGPT's shakespeare_char
            method = "contiguous"
            n_train = int(len(first) * (1 - val_fraction))
            writers["train"].write(first[:n_train])
            writers["val"].write(np.concatenate([first[n_train:], eos_arr]))
            counts = {"train": 1, "val": 1 if val_fraction > 0 else 0}
        else:
            method = "documents"
            _split_documents(itertools.chain([first, second], docs), writers, eos_arr, val_fraction, seed, counts)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if writers["train"].total == 0:
        raise DataError(f"{source}: no train tokens (corpus of {writers['val'].total} tokens is too small "
                        f"for val_fraction={val_fraction})")

    meta = {"format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, "eos_token_id": eos,
            "tokens": {s: writers[s].total for s in SPLITS}, "documents": counts, "split_method": method,
            "files": {s: writers[s].files for s in SPLITS}, "tokenizer_hash": tok_hash, "source": source,
            "settings": settings, "fingerprint": fingerprint}
    tmp = out_dir / f".meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / META_FILE)
    return ShardInfo.from_meta(out_dir, meta)


def _split_documents(docs: Iterator[np.ndarray], writers: dict, eos_arr: np.ndarray, val_fraction: float,
                     seed: int, counts: dict) -> None:
    """Send round(val_fraction * n) documents to val, chosen per group of GROUP_DOCS by a (seed, group) draw.

    The running target floor(f*k + 0.5) after k documents keeps every prefix close to the fraction;
    the last group (whose end reveals n) also enforces at least one val and one train document.
    """
    seen = val_so_far = 0
    group = list(itertools.islice(docs, GROUP_DOCS))
    for g in itertools.count():
        if not group:
            break
        following = list(itertools.islice(docs, GROUP_DOCS))  # look ahead: is this group the last?
        seen += len(group)
        target = math.floor(val_fraction * seen + 0.5)
        if not following and val_fraction > 0:
            target = min(max(target, 1), seen - 1)
        n_val = min(max(target - val_so_far, 0), len(group))
        val_idx = set(np.random.default_rng([seed, g]).choice(len(group), size=n_val, replace=False).tolist())
        for i, doc in enumerate(group):
            split = "val" if i in val_idx else "train"
            writers[split].write(np.concatenate([doc, eos_arr]))
            counts[split] += 1
        val_so_far += n_val
        group = following


def load_shards(out_dir: str | os.PathLike, split: str = "train") -> ShardedTokens:
    """The `split` ("train" or "val") tokens of a complete build, memmapped (nothing is read yet)."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}: expected one of {SPLITS}")
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    files = meta["files"][split]
    if not files:
        raise DataError(f"'{out_dir}': split {split!r} has no tokens (built with "
                        f"val_fraction={meta['settings']['val_fraction']})")
    bad = _bad_shard(out_dir, meta, split)
    if bad is not None:
        raise DataError(f"shard '{out_dir / bad['name']}' is missing or its size differs from meta.json "
                        f"({bad['tokens']} tokens); rebuild with build_shards(..., overwrite=True)")
    return ShardedTokens([out_dir / f["name"] for f in files], meta["dtype"])
