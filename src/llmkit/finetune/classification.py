"""Sequence and token classification: encoded rows, padded batches and the losses.

Sequence classification (BERT fine-tuning, Devlin et al., 2019): the model's SequenceClassifier
pools the sequence (BERT pooler, [CLS], mean, or the last real token for decoders) and
    L = -(1 / B) sum_i log softmax(W pool(h_i) + b)_{y_i}
Token classification (tagging / NER): TokenClassifier scores every token and the loss is the mean
cross-entropy over the first sub-token of each word (other sub-tokens, specials and padding are
-100), the usual word-level labelling of Hugging Face's token-classification examples.

Batches: {"input_ids" (B, T), "attention_mask" (B, T), "labels" (B,) or (B, T)} (+ "token_type_ids"
for text pairs on models with segment embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..data.errors import DataError
from ..objectives.clm import IGNORE_INDEX
from ..tokenizer import Tokenizer
from ..data.epochs import EpochBatches
from .data import LabelVocab, Row


@dataclass
class ClassExample:
    ids: list[int]
    labels: object                    # int (sequence) or list[int] with -100 (token)
    type_ids: Optional[list[int]] = None


def _truncate(values: list, max_len: int, keep_last: bool) -> list:
    """Cut to max_len, keeping the final entry (a [SEP] token and its type id) when keep_last."""
    return values[:max_len - 1] + [values[-1]] if keep_last else values[:max_len]


def encode_sequence_rows(rows: list[Row], tokenizer: Tokenizer, vocab: LabelVocab, split: str,
                         max_len: int) -> list[ClassExample]:
    out = []
    for row in rows:
        text, pair = row.values["text"], row.values.get("text_pair")
        for name, value in (("text", text), ("text_pair", pair)):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{row.where}: column {name!r} = {value!r}: expected a string")
        ids, types = tokenizer.encode_with_types(text, pair)
        label = vocab.encode(row.values["label"], row.where, "label", split)
        if len(ids) > max_len:
            keep_last = ids[-1] in tokenizer.special_ids      # [SEP] stays the last token
            ids, types = (_truncate(ids, max_len, keep_last), _truncate(types, max_len, keep_last))
        out.append(ClassExample(ids, label, types))
    return out


def encode_token_rows(rows: list[Row], tokenizer: Tokenizer, vocab: LabelVocab, split: str,
                      max_len: int) -> list[ClassExample]:
    """Words -> sub-tokens; the word's tag goes on its first sub-token, -100 elsewhere."""
    out = []
    for row in rows:
        words, tags = row.values["tokens"], row.values["tags"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{row.where}: column 'tokens' = {str(words)[:60]!r}: expected a list of words")
        if not isinstance(tags, list) or len(tags) != len(words):
            raise DataError(f"{row.where}: column 'tags' has {len(tags) if isinstance(tags, list) else tags!r} "
                            f"entries for {len(words)} words: expected one tag per word")
        label_ids = [vocab.encode(t, row.where, "tags", split) for t in tags]
        encoding = tokenizer.backend.encode(words, is_pretokenized=True, add_special_tokens=True)
        labels, previous = [], None
        for word in encoding.word_ids:
            labels.append(IGNORE_INDEX if word is None or word == previous else label_ids[word])
            previous = word
        ids = encoding.ids
        if len(ids) > max_len:
            keep_last = ids[-1] in tokenizer.special_ids
            ids, labels = _truncate(ids, max_len, keep_last), _truncate(labels, max_len, keep_last)
        out.append(ClassExample(ids, labels, None))
    return out


class ClassificationBatches(EpochBatches):
    """Seeded epochs of right-padded batches (see llmkit.data.epochs)."""

    def __init__(self, examples: list[ClassExample], batch_size: int, pad_token_id: int, *, shuffle: bool = True,
                 seed: int = 0, token_types: bool = False):
        super().__init__(examples, batch_size, shuffle=shuffle, seed=seed)
        self.pad, self.token_types = pad_token_id, token_types

    def collate(self, items: list[ClassExample]) -> dict:
        B, T = len(items), max(len(e.ids) for e in items)
        input_ids = torch.full((B, T), self.pad, dtype=torch.long)                          # (B, T)
        mask = torch.zeros((B, T), dtype=torch.long)                                        # (B, T)
        per_token = isinstance(items[0].labels, list)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if per_token else \
            torch.tensor([e.labels for e in items], dtype=torch.long)                       # (B, T) or (B,)
        types = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(items):
            n = len(e.ids)
            input_ids[b, :n] = torch.tensor(e.ids)
            mask[b, :n] = 1
            if per_token:
                labels[b, :n] = torch.tensor(e.labels)
            if e.type_ids:
                types[b, :n] = torch.tensor(e.type_ids)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.token_types:
            batch["token_type_ids"] = types
        return batch


def _forward(model, batch: dict):
    extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits


def sequence_classification_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    logits = _forward(model, batch).float()                                        # (B, C)
    loss = F.cross_entropy(logits, batch["labels"])
    accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
    return loss, {"loss": loss.item(), "accuracy": accuracy.item()}


def token_classification_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    logits = _forward(model, batch).float()                                        # (B, T, C)
    labels = batch["labels"]                                                       # (B, T)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    scored = labels != IGNORE_INDEX
    accuracy = (logits.argmax(-1)[scored] == labels[scored]).float().mean()
    return loss, {"loss": loss.item(), "accuracy": accuracy.item()}
