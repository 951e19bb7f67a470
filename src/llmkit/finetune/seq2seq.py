"""Sequence-to-sequence fine-tuning of an encoder-decoder (BART): prompt -> response rows, the
prompt into the encoder, the response teacher-forced through the decoder.

    input_ids          (B, S)  prompt + </s>, right-padded (attention_mask marks real tokens)
    labels             (B, T)  response + </s>, −100 on padding
    decoder_input_ids  (B, T)  labels shifted right behind the decoder start token

Loss: the mean cross-entropy over the label tokens (objectives/dae.py's). Evaluation: that loss,
teacher-forced token accuracy, and exact match of greedy generations against the responses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.epochs import EpochBatches
from ..data.errors import DataError
from ..generation import generate
from ..objectives.dae import IGNORE_INDEX, dae_loss, pad_sequences, reconstruction_accuracy
from .data import Row


@dataclass
class Seq2SeqExample:
    source: list[int]          # prompt + eos
    target: list[int]          # response + eos
    where: str


def encode_seq2seq_rows(rows: list[Row], tokenizer, *, max_len: int) -> list[Seq2SeqExample]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token: a seq2seq example ends source and target with it")
    out = []
    for row in rows:
        source = tokenizer.encode(str(row.values["prompt"]))[: max_len - 1] + [eos]
        target = tokenizer.encode(str(row.values["response"]))[: max_len - 1] + [eos]
        if len(target) == 1:
            raise DataError(f"{row.where}: the response is empty; a seq2seq target needs at least one token")
        out.append(Seq2SeqExample(source, target, row.where))
    return out


class Seq2SeqBatches(EpochBatches):
    """Seeded epochs of right-padded (source, target) batches."""

    def __init__(self, examples: list[Seq2SeqExample], batch_size: int, pad_token_id: int, start_token_id: int, *,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(examples, batch_size, shuffle=shuffle, seed=seed)
        self.pad, self.start = pad_token_id, start_token_id

    def collate(self, items: list[Seq2SeqExample]) -> dict:
        source = pad_sequences([torch.tensor(e.source) for e in items], self.pad)               # (B, S)
        labels = pad_sequences([torch.tensor(e.target) for e in items], IGNORE_INDEX)           # (B, T)
        decoder_input_ids = torch.full_like(labels, self.start)
        decoder_input_ids[:, 1:] = labels[:, :-1]
        decoder_input_ids.masked_fill_(decoder_input_ids == IGNORE_INDEX, self.pad)
        return {"input_ids": source, "attention_mask": (source != self.pad).long(), "labels": labels,
                "decoder_input_ids": decoder_input_ids}


def seq2seq_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    logits = model(batch["input_ids"], batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"]).logits                         # (B, T, V)
    return dae_loss(logits, batch["labels"]), {}


@torch.no_grad()
def evaluate_seq2seq(model, batches: list[dict], max_new_tokens: int) -> dict:
    """Mean loss, teacher-forced token accuracy and greedy exact match over the batches."""
    was = model.training
    model.eval()
    losses, accuracies, exact, n = [], [], 0, 0
    eos = model.config.eos_token_id
    for batch in batches:
        logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"]).logits
        losses.append(float(dae_loss(logits, batch["labels"])))
        accuracies.append(reconstruction_accuracy(logits, batch["labels"]))
        out = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                       max_new_tokens=max(max_new_tokens, batch["labels"].shape[1]))[:, 1:]        # (B, n)
        for row, labels in zip(out.tolist(), batch["labels"].tolist()):
            target = [t for t in labels if t != IGNORE_INDEX]
            made = row[: row.index(eos) + 1] if eos in row else row
            exact += int(made == target)
            n += 1
    model.train(was)
    return {"loss": sum(losses) / len(losses), "token_accuracy": sum(accuracies) / len(accuracies),
            "exact_match": exact / max(n, 1)}
