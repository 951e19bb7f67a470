"""llmkit.data: sources, tokenized shards, resumable batches (random windows, packed, streaming)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from llmkit.data import (DataError, PackedBatches, RandomWindowBatches, ShardedTokens, StreamingBatches,
                         build_shards, iter_texts, load_shards)
from llmkit.tokenizer import train_char

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_tok(shakespeare):
    return train_char(texts=[shakespeare, "0123456789"])


def _docs(n: int = 40) -> list[str]:
    rng = np.random.default_rng(1)
    words = ["the", "king", "queen", "sword", "night", "crown", "love", "death"]
    return [" ".join(rng.choice(words, size=rng.integers(3, 30))) + f" {i}." for i in range(n)]


def _packed_stream(texts, tok) -> np.ndarray:
    return np.concatenate([np.asarray(tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]) for t in texts])


# ---- sources ---------------------------------------------------------------------------------
def test_iter_texts_txt_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\nline two\n\n\npara two a\npara two b\n", encoding="utf-8")
    assert list(iter_texts(p)) == [p.read_text()]
    assert list(iter_texts(str(p), split_lines=True)) == ["line one", "line two", "para two a", "para two b"]
    assert list(iter_texts(p, split_lines="paragraphs")) == ["line one\nline two", "para two a\npara two b"]
    with pytest.raises(DataError, match="split_lines='words'"):
        iter_texts(p, split_lines="words")


def test_iter_texts_jsonl_lists_and_globs(tmp_path):
    (tmp_path / "x1.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta", "id": 2}\n')
    (tmp_path / "x2.jsonl").write_text('{"body": "gamma"}\n')
    (tmp_path / "y.txt").write_text("delta")
    assert list(iter_texts(tmp_path / "x1.jsonl")) == ["alpha", "beta"]
    assert list(iter_texts([str(tmp_path / "x1.jsonl"), str(tmp_path / "y.txt")])) == ["alpha", "beta", "delta"]
    assert list(iter_texts(str(tmp_path / "x2.jsonl"), text_field="body")) == ["gamma"]
    # a glob in a list of paths; a plain list of strings is a list of documents
    assert list(iter_texts([str(tmp_path / "*.txt")])) == ["delta"]
    assert list(iter_texts(["just some text", "more text"])) == ["just some text", "more text"]
    assert list(iter_texts(t for t in ["gen", "", "erator"])) == ["gen", "erator"]  # empty documents skipped
    # real data: self-instruct (jsonl) and SST-2 (tsv with a header)
    assert len(list(iter_texts(SHARED_DATA / "self_instruct_seed_tasks.jsonl", text_field="instruction"))) == 175
    assert len(list(iter_texts(SHARED_DATA / "sst2" / "dev.tsv", text_field="content"))) == 872
    assert len(list(iter_texts(SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz", text_field="chosen"))) == 2312
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    assert list(iter_texts(tmp_path / "arr.json")) == ["a", "b"]


def test_iter_texts_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl' line 2: missing field 'text'.*content"):
        list(iter_texts(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl' line 2: not valid JSON"):
        list(iter_texts(broken))
    with pytest.raises(DataError, match=r"line 1: field 'text' must be a string, got int"):
        (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
        list(iter_texts(tmp_path / "num.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        iter_texts(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=r"glob pattern .*\*\.jsonl"):
        iter_texts([str(tmp_path / "nothing" / "*.jsonl")])
    with pytest.raises(DataError, match="pass a list"):
        iter_texts("a document\nwith two lines")
    with pytest.raises(DataError, match=r"texts\[1\]: expected a string, got int"):
        list(iter_texts(["fine", 7]))
    with pytest.raises(DataError, match="no column 'text'.*content"):
        iter_texts(SHARED_DATA / "sst2" / "dev.tsv").__next__()
    with pytest.raises(DataError, match="got int"):
        iter_texts(42)


def test_datasets_is_not_imported_by_llmkit_data():
    code = "import sys, llmkit.data; assert 'datasets' not in sys.modules, 'datasets imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_iter_texts_hf_datasets():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "two", "", "three"], "label": [0, 1, 0, 1]})
    assert list(iter_texts(ds)) == ["one", "two", "three"]
    assert list(iter_texts(ds.to_iterable_dataset())) == ["one", "two", "three"]
    with pytest.raises(DataError, match=r"no column 'body' \(columns: \['text', 'label'\]\)"):
        iter_texts(ds, text_field="body")
    with pytest.raises(DataError, match="pass one split"):
        iter_texts(datasets.DatasetDict({"train": ds}))
    with pytest.raises(DataError, match="column 'label' must hold strings"):
        list(iter_texts(ds, text_field="label"))


# ---- shards ----------------------------------------------------------------------------------
def test_build_shards_shakespeare_split_roundtrip_meta(tmp_path, shakespeare, char_tok):
    info = build_shards(SHAKESPEARE, char_tok, tmp_path / "sh")
    n = len(shakespeare)
    n_train = int(n * 0.9)  # nanoGPT shakespeare_char/prepare.py: data[:int(n*0.9)]
    assert (info.train_tokens, info.val_tokens) == (n_train, n - n_train + 1)  # val ends with the EOS
    assert info.split_method == "contiguous" and not info.reused
    train, val = load_shards(tmp_path / "sh", "train"), load_shards(tmp_path / "sh", "val")
    assert train.dtype == np.uint16 and len(train) == n_train and len(val) == n - n_train + 1
    assert char_tok.decode(train[1000:1500]) == shakespeare[1000:1500]
    assert char_tok.decode(val[:-1]) == shakespeare[n_train:]
    assert int(val[-1]) == char_tok.eos_token_id
    meta = json.loads((tmp_path / "sh" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == char_tok.vocab_size
    assert meta["tokens"] == {"train": n_train, "val": n - n_train + 1}
    assert [f["name"] for f in meta["files"]["train"]] == ["train_00000.bin"]
    assert len(meta["tokenizer_hash"]) == 64 and "tinyshakespeare.txt" in meta["source"]
    assert (tmp_path / "sh" / "train_00000.bin").stat().st_size == 2 * n_train
    # unchanged inputs: reused, not rebuilt
    assert build_shards(SHAKESPEARE, char_tok, tmp_path / "sh").reused


def test_interrupted_build_is_rebuilt(tmp_path, char_tok):
    docs = _docs(30)
    out = tmp_path / "sh"
    first = build_shards(docs, char_tok, out, shard_tokens=100)
    assert len(first.train_files) > 2
    good = np.asarray(load_shards(out, "train")).copy()
    # simulate a crash mid-build: meta.json not written yet, a shard half-written, a temp file left
    (out / "meta.json").unlink()
    with open(out / first.train_files[1], "r+b") as f:
        f.truncate(10)
    (out / ".train_00007.bin.123.tmp").write_bytes(b"junk")
    with pytest.raises(DataError, match="interrupted"):
        load_shards(out, "train")
    again = build_shards(docs, char_tok, out, shard_tokens=100)
    assert not again.reused
    np.testing.assert_array_equal(np.asarray(load_shards(out, "train")), good)
    assert not list(out.glob("*.tmp"))
    # a damaged shard under an intact meta.json is detected too
    with open(out / again.train_files[0], "r+b") as f:
        f.truncate(4)
    with pytest.raises(DataError, match="size differs"):
        load_shards(out, "train")
    assert not build_shards(docs, char_tok, out, shard_tokens=100).reused


def test_document_split_is_seeded_and_exact(tmp_path, char_tok):
    docs = _docs(50)
    info = build_shards(docs, char_tok, tmp_path / "a", seed=0, shard_tokens=64)
    assert info.split_method == "documents" and info.documents == {"train": 45, "val": 5}
    eos = char_tok.eos_token_id

    def split_docs(out, split):
        toks = np.asarray(load_shards(out, split)).tolist()
        text = char_tok.decode(toks, skip_special_tokens=False)
        assert toks[-1] == eos
        return text.split(char_tok.eos_token)[:-1]

    train, val = split_docs(tmp_path / "a", "train"), split_docs(tmp_path / "a", "val")
    assert len(val) == 5 and sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert train == [d for d in docs if d in set(train)]  # documents keep their order
    build_shards(docs, char_tok, tmp_path / "b", seed=0)
    assert split_docs(tmp_path / "b", "val") == val  # deterministic
    build_shards(docs, char_tok, tmp_path / "c", seed=1)
    assert split_docs(tmp_path / "c", "val") != val
    # a tiny corpus still gets one val document; val_fraction=0 gives none
    assert build_shards(docs[:3], char_tok, tmp_path / "d").documents == {"train": 2, "val": 1}
    none = build_shards(docs[:3], char_tok, tmp_path / "e", val_fraction=0)
    assert none.val_tokens == 0
    with pytest.raises(DataError, match="split 'val' has no tokens"):
        load_shards(tmp_path / "e", "val")


def test_sharded_tokens_slicing_and_dtype(tmp_path, char_tok):
    info = build_shards(_docs(20), char_tok, tmp_path / "s", val_fraction=0, shard_tokens=37)
    tokens = load_shards(tmp_path / "s", "train")
    assert isinstance(tokens, ShardedTokens) and len(info.train_files) > 5
    full = np.concatenate([np.fromfile(tmp_path / "s" / f, dtype=np.uint16) for f in info.train_files])
    assert len(tokens) == len(full) == info.train_tokens
    for a, b in [(0, 37), (30, 80), (36, 38), (5, len(full)), (100, 99), (-50, -3)]:
        np.testing.assert_array_equal(tokens[a:b], full[a:b])
    np.testing.assert_array_equal(tokens[3:200:7], full[3:200:7])
    assert tokens[74] == full[74] and tokens[-1] == full[-1]
    with pytest.raises(IndexError):
        tokens[len(full)]
    copy = pickle.loads(pickle.dumps(tokens))  # DataLoader workers get the file list, not the tokens
    assert len(pickle.dumps(tokens)) < 2000 and np.array_equal(copy[0:len(copy)], full)

    class BigVocab:  # any tokenizer-like object works; vocab >= 65536 needs uint32
        vocab_size, eos_token_id = 70_000, 69_999

        def encode_batch(self, texts, add_special_tokens=False):
            return [[60_000 + ord(c) for c in t] for t in texts]

    big = build_shards(["ab", "cd", "ef"], BigVocab(), tmp_path / "big")
    assert big.dtype == "uint32" and int(load_shards(tmp_path / "big", "train")[0]) == 60_000 + ord("a")


def test_build_shards_errors(tmp_path, char_tok):
    with pytest.raises(DataError, match="empty corpus"):
        build_shards(["", ""], char_tok, tmp_path / "x")
    with pytest.raises(DataError, match=r"val_fraction=1\.5"):
        build_shards(["a"], char_tok, tmp_path / "x", val_fraction=1.5)
    with pytest.raises(DataError, match="split='test'"):
        load_shards(tmp_path / "x", "test")
    with pytest.raises(DataError, match="no meta.json"):
        load_shards(tmp_path / "nowhere", "train")


# ---- random windows --------------------------------------------------------------------------
def test_random_windows_shift_determinism_resume_ranks():
    tokens = np.arange(5000, dtype=np.uint16) % 977
    loader = RandomWindowBatches(tokens, 8, 16, seed=3)
    assert loader.tokens_per_batch == 128
    batches = [next(loader) for _ in range(6)]
    for step, b in enumerate(batches):
        assert b["input_ids"].shape == (8, 16) and b["input_ids"].dtype == torch.int64
        assert torch.equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
        for row, start in zip(b["input_ids"], RandomWindowBatches(tokens, 8, 16, seed=3).offsets(step)):
            assert torch.equal(row, torch.from_numpy(tokens[start:start + 16].astype(np.int64)))
            assert int(b["targets"][0, -1]) == int(tokens[RandomWindowBatches(tokens, 8, 16, seed=3).offsets(step)[0] + 16])
    again = RandomWindowBatches(tokens, 8, 16, seed=3)
    assert all(torch.equal(next(again)["input_ids"], b["input_ids"]) for b in batches)
    assert not torch.equal(next(RandomWindowBatches(tokens, 8, 16, seed=4))["input_ids"], batches[0]["input_ids"])
    # resume: 3 steps, save, restore into a fresh loader, continue
    first = RandomWindowBatches(tokens, 8, 16, seed=3)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain, serializable
    resumed = RandomWindowBatches(tokens, 8, 16, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["input_ids"], b["input_ids"]) for b in batches[3:])
    # 2 ranks x 4 rows, interleaved back, are the single-process global batch
    ranks = [RandomWindowBatches(tokens, 8, 16, seed=3, rank=r, world_size=2) for r in range(2)]
    for b in batches:
        parts = [next(r) for r in ranks]
        merged = torch.empty_like(b["input_ids"])
        merged[0::2], merged[1::2] = parts[0]["input_ids"], parts[1]["input_ids"]
        assert parts[0]["input_ids"].shape == (4, 16) and torch.equal(merged, b["input_ids"])
    ranks[1].load_state_dict(first.state_dict())  # a state saved by one process resumes per rank
    with pytest.raises(DataError, match="seed=3 but this RandomWindowBatches has seed=5"):
        RandomWindowBatches(tokens, 8, 16, seed=5).load_state_dict(state)


def test_batch_errors():
    tokens = np.arange(100)
    with pytest.raises(DataError, match="batch_size=6 .* divisible by world_size=4"):
        RandomWindowBatches(tokens, 6, 8, world_size=4)
    with pytest.raises(DataError, match="block_size=100 needs at least 101 tokens.*has 100"):
        RandomWindowBatches(tokens, 2, 100)
    with pytest.raises(DataError, match="rank=2"):
        PackedBatches(tokens, 2, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="12 blocks .* fewer than batch_size=16"):
        PackedBatches(tokens, 16, 8)
    with pytest.raises(DataError, match="expected a PackedBatches state"):
        PackedBatches(tokens, 2, 8).load_state_dict(RandomWindowBatches(tokens, 2, 8).state_dict())
    with pytest.raises(DataError, match="needs eos_token_id"):
        PackedBatches(tokens, 2, 8, reset_positions_at_eos=True)


# ---- packed ----------------------------------------------------------------------------------
def test_packed_covers_every_block_once_per_epoch_and_resumes():
    T, B = 10, 4
    tokens = np.arange(423)  # (423 - 1) // 10 = 42 blocks; 10 full batches per epoch
    loader = PackedBatches(tokens, B, T, seed=7)
    assert loader.num_blocks == 42 and len(loader) == 10
    epochs = []
    for _ in range(2):
        ids = [next(loader) for _ in range(len(loader))]
        for b in ids:
            assert torch.equal(b["targets"], b["input_ids"] + 1)  # tokens are 0, 1, 2, ...: shifted by one
        starts = torch.cat([b["input_ids"][:, 0] for b in ids]).tolist()
        assert len(set(starts)) == 40 and all(s % T == 0 for s in starts)  # 40 distinct blocks, no repeats
        epochs.append(starts)
    assert epochs[0] != epochs[1] and loader.epoch == 1
    # resume mid-epoch
    ref = PackedBatches(tokens, B, T, seed=7)
    straight = [next(ref)["input_ids"] for _ in range(17)]
    a = PackedBatches(tokens, B, T, seed=7)
    for _ in range(13):
        next(a)
    b = PackedBatches(tokens, B, T, seed=7)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["epoch"] == 1 and b.state_dict()["position"] == 12
    assert all(torch.equal(next(b)["input_ids"], x) for x in straight[13:])
    # ranks: disjoint rows whose union is the global batch
    r0, r1 = (PackedBatches(tokens, B, T, seed=7, rank=r, world_size=2) for r in range(2))
    for x in straight[:10]:
        p0, p1 = next(r0)["input_ids"], next(r1)["input_ids"]
        assert set(p0[:, 0].tolist()).isdisjoint(p1[:, 0].tolist())
        assert torch.equal(torch.stack([p0, p1], 1).reshape(B, T), x)


def test_packed_validation_pass_and_positions():
    tokens = np.arange(95)
    val = PackedBatches(tokens, 4, 10, shuffle=False, drop_last=False)
    batches = list(val.iter_once())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 1] and len(val) == 3
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]).flatten(), torch.arange(90))
    assert list(val.iter_once())[0]["input_ids"].equal(batches[0]["input_ids"]) and val.position == 0
    # document boundaries: EOS = 0 ends documents; positions restart after it
    stream = np.array([5, 6, 0, 7, 8, 9, 0, 3, 4, 0, 2, 2, 2])
    b = next(iter(PackedBatches(stream, 1, 12, shuffle=False, reset_positions_at_eos=True, eos_token_id=0)))
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert b["doc_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]


# ---- streaming -------------------------------------------------------------------------------
def test_streaming_equals_packed_and_resumes(char_tok):
    texts = _docs(60)
    T, B = 32, 4
    packed = PackedBatches(_packed_stream(texts, char_tok), B, T, shuffle=False)
    stream = StreamingBatches(lambda: iter(texts), char_tok, B, T, encode_chunk=7)
    for _ in range(2 * len(packed) + 3):  # across two epoch boundaries
        p, s = next(packed), next(stream)
        assert torch.equal(p["input_ids"], s["input_ids"]) and torch.equal(p["targets"], s["targets"])
    assert stream.epoch == packed.epoch == 2
    assert len(list(stream.iter_once())) == len(packed)
    # resume mid-epoch
    ref = StreamingBatches(lambda: iter(texts), char_tok, B, T)
    straight = [next(ref)["input_ids"] for _ in range(len(packed) + 4)]
    a = StreamingBatches(lambda: iter(texts), char_tok, B, T)
    for _ in range(5):
        next(a)
    b = StreamingBatches(lambda: iter(texts), char_tok, B, T)
    next(b), next(b)  # a loader already mid-stream: loading a state must move it
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert all(torch.equal(next(b)["input_ids"], x) for x in straight[5:])
    # ranks take alternate blocks of each global batch
    r1 = StreamingBatches(texts, char_tok, B, T, rank=1, world_size=2)  # a list source is re-read per epoch
    assert all(torch.equal(next(r1)["input_ids"], x[1::2]) for x in straight)


def test_streaming_is_lazy(char_tok):
    pulled = []

    def factory():
        def gen():
            for i in range(10 ** 9):  # effectively endless: materialising it would never finish
                pulled.append(i)
                yield f"document number {i} says hello."
        return gen()

    loader = StreamingBatches(factory, char_tok, 4, 64, encode_chunk=16, reset_positions_at_eos=True)
    for _ in range(3):
        batch = next(loader)
    assert batch["input_ids"].shape == (4, 64) and len(pulled) <= 48
    eos = char_tok.eos_token_id
    after_eos = torch.nonzero(batch["input_ids"][:, :-1] == eos)
    assert len(after_eos) and all(batch["position_ids"][r, c + 1] == 0 for r, c in after_eos.tolist())


def test_streaming_errors(char_tok, tmp_path):
    once = iter(_docs(30))
    with pytest.raises(DataError, match="fresh"):
        StreamingBatches(once, char_tok, 2, 16)
    loader = StreamingBatches(lambda: once, char_tok, 2, 16)  # returns the same iterator every time
    with pytest.raises(DataError, match="exhausted iterator"):
        for _ in range(1000):
            next(loader)
    with pytest.raises(DataError, match="too small"):
        next(StreamingBatches(lambda: iter(["tiny"]), char_tok, 2, 16))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        StreamingBatches(str(tmp_path / "nope.jsonl"), char_tok, 2, 16)
