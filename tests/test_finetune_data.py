"""Fine-tuning data: sources, column mapping, label vocabulary, and errors naming row and column."""
from __future__ import annotations

import json

import pytest

from llmkit.data.errors import DataError
from llmkit.finetune.classification import encode_token_rows
from llmkit.finetune.data import LabelVocab, load_rows
from llmkit.tokenizer import train_char


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_csv_jsonl_sources_with_column_mapping(tmp_path):
    tsv = _write(tmp_path / "a.tsv", 'label\tsentence\n1\tit is "great"\n0\tbad\n')
    csv = _write(tmp_path / "a.csv", 'sentence,label\n"good, really",1\n')
    jsonl = _write(tmp_path / "a.jsonl", json.dumps({"sentence": "meh", "label": 0}) + "\n\n")
    for source, n in ((tsv, 2), (csv, 1), (jsonl, 1)):
        rows, shape = load_rows(str(source), "train", "auto", "sequence_classification", {"text": "sentence"})
        assert shape == "text_label" and len(rows) == n
    rows, _ = load_rows(str(tsv), "train", "auto", "sequence_classification", {"text": "sentence"})
    assert rows[0].values == {"text": 'it is "great"', "label": "1"} and rows[0].where == "'a.tsv' row 1"
    # A source may carry its own mapping (SST-2's dev file calls the column `content`).
    dev = _write(tmp_path / "dev.tsv", "label\tcontent\n0\tfine\n")
    rows, _ = load_rows({"path": str(dev), "columns": {"text": "content"}}, "dev", "text_label",
                        "sequence_classification", {"text": "sentence"})
    assert rows[0].values["text"] == "fine"


def test_hf_datasets_in_memory_and_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "2+2?", "response": "4"}, {"prompt": "3+3?", "response": "6"}])
    rows, shape = load_rows(ds, "train", "auto", "causal_lm", {})
    assert shape == "prompt_response" and rows[1].values["response"] == "6" and rows[1].where == "train dataset row 1"
    ds.save_to_disk(str(tmp_path / "ds"))
    rows, _ = load_rows({"hf": str(tmp_path / "ds")}, "train", "auto", "causal_lm", {})
    assert len(rows) == 2
    chat = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}])
    assert load_rows(chat, "train", "auto", "causal_lm", {})[1] == "messages"


def test_missing_column_names_the_column_and_the_columns_found(tmp_path):
    path = _write(tmp_path / "train.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"'train.jsonl' line 1: missing column 'prompt'.*"
                                        r"data.columns.prompt.*columns found: \['answer', 'question'\]"):
        load_rows(str(path), "train", "prompt_response", "causal_lm", {})
    rows, _ = load_rows(str(path), "train", "prompt_response", "causal_lm", {"prompt": "question", "response": "answer"})
    assert rows[0].values == {"prompt": "q", "response": "a"}
    with pytest.raises(DataError, match=r"missing column 'txt' \(data.columns.text='txt'\)"):
        load_rows(str(path), "train", "auto", "sequence_classification", {"text": "txt"})


def test_a_dev_label_never_seen_in_train_names_the_row_and_value(tmp_path):
    train = _write(tmp_path / "train.tsv", "label\tsentence\n0\ta\n1\tb\n1\tc\n")
    dev = _write(tmp_path / "dev.tsv", "label\tsentence\n1\td\n2\te\n")
    train_rows, _ = load_rows(str(train), "train", "auto", "sequence_classification", {"text": "sentence"})
    vocab = LabelVocab.from_rows(train_rows, "label")
    assert vocab.names == ["0", "1"]
    dev_rows, _ = load_rows(str(dev), "dev", "auto", "sequence_classification", {"text": "sentence"})
    assert vocab.encode(dev_rows[0].values["label"], dev_rows[0].where, "label", "dev") == 1
    with pytest.raises(DataError, match=r"'dev.tsv' row 2: dev label '2' \(column 'label'\) never appears in train "
                                        r"\(train labels: \['0', '1'\]\)"):
        vocab.encode(dev_rows[1].values["label"], dev_rows[1].where, "label", "dev")


def test_numeric_labels_sort_as_numbers_and_a_seeded_subset_is_stable(tmp_path):
    lines = "".join(f"{i % 11}\tsentence {i}\n" for i in range(50))
    path = _write(tmp_path / "t.tsv", "label\tsentence\n" + lines)
    rows, _ = load_rows(str(path), "train", "auto", "sequence_classification", {"text": "sentence"})
    assert LabelVocab.from_rows(rows, "label").names == [str(i) for i in range(11)]
    a, _ = load_rows(str(path), "train", "auto", "sequence_classification", {"text": "sentence"}, limit=10, seed=3)
    b, _ = load_rows(str(path), "train", "auto", "sequence_classification", {"text": "sentence"}, limit=10, seed=3)
    assert [r.where for r in a] == [r.where for r in b] and len(a) == 10


def test_token_tags_go_on_the_first_sub_token_of_each_word():
    tok = train_char(texts=["the cat sat"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    rows, _ = load_rows([{"tokens": ["the", "cat"], "tags": ["O", "B-ANIMAL"]}], "train", "auto",
                        "token_classification", {})
    vocab = LabelVocab.from_rows(rows, "tags")
    (ex,) = encode_token_rows(rows, tok, vocab, "train", 32)
    # char tokens: t h e c a t -> labels on 't' and 'c' only
    assert ex.labels == [vocab.index["O"], -100, -100, vocab.index["B-ANIMAL"], -100, -100]
    bad, _ = load_rows([{"tokens": ["the"], "tags": ["X"]}], "dev", "auto", "token_classification", {})
    with pytest.raises(DataError, match=r"dev row 0: dev label 'X' \(column 'tags'\) never appears in train"):
        encode_token_rows(bad, tok, vocab, "dev", 32)
