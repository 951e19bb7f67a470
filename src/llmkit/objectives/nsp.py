"""Next-sentence prediction, and BERT's combined objective (MLM + NSP on one batch).

Devlin et al., 2019 (BERT), §3.1 Task #2. Each example is a pair (A, B) packed as

    [CLS] A [SEP] B [SEP]        token_type_ids 0 … 0 (CLS, A, first SEP) 1 … 1 (B, last SEP)

where B is the sentence that truly follows A in its document (label 0 = IsNext, Hugging Face's
convention) or, with probability 1/2, a sentence drawn uniformly from the other documents
(label 1 = NotNext). A binary head on the pooled [CLS] vector scores the pair (c = tanh(W h_[CLS])):

    L_nsp = −(1 / B) Σ_b log softmax(W_nsp c_b)[y_b]          nsp_acc = mean(argmax = y)

BERT pretraining minimises L = L_mlm + L_nsp on the same forward pass (`BertObjective`).

Corpus rule (`split_documents`): every text of the source is cut into documents at blank lines
(tinyshakespeare: one speech, speaker line included, per document), and a document into sentences
after ". ", "! " or "? " (any whitespace, newlines included). A is drawn among sentences that have a
successor in their document, for both labels, so A alone tells nothing. Truncation to block_size:
the longer side is trimmed first until the pair fits (if both are longer than half, A keeps
⌈budget/2⌉ tokens); A loses tokens from its start and B from its end, so the A|B boundary survives.

Which to use: `bert` (one batch, masked pairs, both losses on one forward: BERT's recipe and half
the compute) for MLM + NSP; `{mlm: 1, nsp: 1}` (WeightedMix: MLM on long contiguous windows, NSP
on unmasked pairs, two forwards per step) when the two should see different data or weights;
`nsp` alone to fine-tune only the pair head/encoder.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batches import StepBatches, check_layout
from .mlm import SPECIAL_TOKENS, MaskVocab, encoder_forward, mask_generator, mask_tokens, mlm_loss, require_roles

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def split_documents(text: str) -> list[list[str]]:
    """text -> documents (blank-line separated) -> sentences (after . ! ? and whitespace)."""
    docs = []
    for block in _BLANK_LINE.split(text):
        sentences = [s.strip() for s in _SENTENCE_END.split(block.strip()) if s.strip()]
        if sentences:
            docs.append(sentences)
    return docs


class SentenceCorpus:
    """Tokenized sentences, flat: sentence i is tokens[offsets[i]:offsets[i+1]], in document
    doc_of[i]; document d holds sentences doc_start[d] … doc_start[d+1] − 1."""

    def __init__(self, docs: list[list[list[int]]], name: str = "corpus"):
        lengths = [len(s) for d in docs for s in d]
        self.tokens = np.fromiter((t for d in docs for s in d for t in s), dtype=np.int64, count=sum(lengths))
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])               # (N + 1,)
        self.doc_start = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])  # (D + 1,)
        self.doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])                   # (N,)
        self.n_docs, self.n_sentences = len(docs), len(lengths)
        n_multi = sum(len(d) >= 2 for d in docs)
        if self.n_docs < 2 or n_multi == 0:
            raise ValueError(f"{name} is too short to make NSP pairs: {self.n_docs} documents, {n_multi} with 2 "
                             "or more sentences; expected at least 2 documents and at least one with 2 sentences "
                             "(documents are split at blank lines, sentences after '. ', '! ', '? ')")
        self.firsts = np.flatnonzero(self.doc_of[:-1] == self.doc_of[1:])  # sentences with a successor

    @classmethod
    def from_docs(cls, docs: list[list[str]], tokenizer, name: str = "corpus") -> "SentenceCorpus":
        """Documents of sentence strings (`split_documents`) -> a tokenized corpus."""
        flat = [s for d in docs for s in d]
        ids = iter(tokenizer.encode_batch(flat, add_special_tokens=False) if flat else [])
        return cls([[next(ids) for _ in d] for d in docs], name)

    @classmethod
    def from_texts(cls, texts, tokenizer, name: str = "corpus") -> "SentenceCorpus":
        return cls.from_docs([d for text in texts for d in split_documents(text)], tokenizer, name)

    def sentence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n pairs: (a, b, label) sentence indices and labels (0 = IsNext, 1 = random), each (n,)."""
        a = self.firsts[rng.integers(len(self.firsts), size=n)]                    # (n,)
        label = (rng.random(n) < 0.5).astype(np.int64)                             # (n,)
        d = self.doc_of[a]
        start, size = self.doc_start[d], self.doc_start[d + 1] - self.doc_start[d]
        other = rng.integers(0, self.n_sentences - size)                            # skip A's document
        other = np.where(other >= start, other + size, other)
        return a, np.where(label == 0, a + 1, other), label


def pair_lengths(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Kept lengths of A and B: the longer side is trimmed first until la + lb <= budget."""
    if la + lb <= budget:
        return la, lb
    ka = min(la, max(budget - lb, (budget + 1) // 2))
    return ka, min(lb, budget - ka)


class NextSentenceBatches(StepBatches):
    """Endless NSP batches: step s draws a GLOBAL batch of pairs from numpy's rng (seed, s); rank r
    keeps rows r::world_size. Rows are padded to the global batch's longest row. With `mask`
    (a MaskVocab) the ids are also BERT-masked by `mask_generator(seed, s)` (BertObjective).
    Batches: {"input_ids", "token_type_ids", "attention_mask"} (b, T), "next_sentence_label" (b,),
    + "labels" (b, T) when masking. State: {"step"}."""
    _config_keys = ("seed", "batch_size", "block_size")

    def __init__(self, corpus: SentenceCorpus, batch_size: int, block_size: int, *, cls_id: int, sep_id: int,
                 pad_id: Optional[int] = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mask: Optional[MaskVocab] = None, mask_prob: float = 0.15, whole_word: bool = False):
        check_layout(batch_size, block_size, rank, world_size, seed)
        if block_size < 5:
            raise ValueError(f"block_size={block_size}: NSP pairs need at least 5 ([CLS] a [SEP] b [SEP])")
        self.corpus, self.batch_size, self.block_size = corpus, batch_size, block_size
        self.cls_id, self.sep_id = cls_id, sep_id
        self.pad_id = sep_id if pad_id is None else pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.mask, self.mask_prob, self.whole_word = mask, mask_prob, whole_word
        self.step = 0

    def batch_at(self, step: int) -> dict:
        a_idx, b_idx, label = self.corpus.draw(np.random.default_rng([self.seed, int(step)]), self.batch_size)
        rows, types = [], []
        for a_i, b_i in zip(a_idx, b_idx):
            a, b = self.corpus.sentence(a_i), self.corpus.sentence(b_i)
            ka, kb = pair_lengths(len(a), len(b), self.block_size - 3)
            a, b = a[len(a) - ka:], b[:kb]                                        # keep the A|B boundary
            rows.append(np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]]))
            types.append(np.concatenate([np.zeros(ka + 2, np.int64), np.ones(kb + 1, np.int64)]))
        T = max(len(r) for r in rows)
        ids = torch.full((self.batch_size, T), self.pad_id, dtype=torch.long)      # (B, T)
        token_types = torch.zeros((self.batch_size, T), dtype=torch.long)          # (B, T)
        attention = torch.zeros((self.batch_size, T), dtype=torch.long)            # (B, T)
        for i, (row, typ) in enumerate(zip(rows, types)):
            ids[i, :len(row)], token_types[i, :len(row)], attention[i, :len(row)] = (
                torch.from_numpy(row), torch.from_numpy(typ), 1)
        batch = {"input_ids": ids, "token_type_ids": token_types, "attention_mask": attention,
                 "next_sentence_label": torch.from_numpy(label)}
        if self.mask is not None:
            batch["input_ids"], batch["labels"] = mask_tokens(ids, self.mask, mask_prob=self.mask_prob,
                                                              whole_word=self.whole_word,
                                                              generator=mask_generator(self.seed, step))
        r, n = self.rank, self.world_size
        return {k: v[r::n].contiguous() for k, v in batch.items()}


def nsp_loss(nsp_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L_nsp and its accuracy: nsp_logits (B, 2), labels (B,) with 0 = IsNext, 1 = NotNext."""
    logits = nsp_logits.float()
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean().item()
    return loss, {"loss": loss.item(), "nsp_acc": acc}


def _nsp_logits(out) -> torch.Tensor:
    logits = getattr(out, "nsp_logits", None)
    if logits is None:
        raise ValueError("the model has no NSP head (its output has no nsp_logits): expected the model of "
                         "task 'pretraining' (MaskedLM with nsp=True)")
    return logits


def split_documents_of(source, data, val_fraction: float) -> tuple[list, list]:
    """Documents of `source`, split by a (data.seed) draw into train and val documents."""
    from ..data import iter_texts
    docs = [d for text in iter_texts(source, text_field=data.text_field, split_lines=data.split_lines)
            for d in split_documents(text)]
    n_val = int(round(val_fraction * len(docs))) if val_fraction > 0 else 0
    val_idx = set(np.random.default_rng(data.seed).permutation(len(docs))[:n_val].tolist())
    return [d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx]


class NextSentenceObjective:
    """NSP alone on unmasked pairs: trains the `pretraining` model's pooler + NSP head (and encoder)."""

    name = "nsp"
    task = "pretraining"
    tasks = ("pretraining",)
    special_tokens = dict(SPECIAL_TOKENS)
    masked = False

    def __init__(self, mask_prob: float = 0.15, whole_word: bool = False):
        self.mask_prob, self.whole_word = mask_prob, whole_word
        self._checked: set = set()

    def build_model(self, config):
        from ..model import build_model
        from .mlm import check_encoder_config
        check_encoder_config(config, self.name)
        return build_model(config, self.task)

    def make_data(self, source: Any, tokenizer, data, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  eval_batches: int = 20):
        from ..data import describe_source
        from .base import ObjectiveData
        require_roles(tokenizer)
        train_docs, val_docs = split_documents_of(source, data, data.val_fraction)
        name = describe_source(source)

        def corpus(docs, split):
            return SentenceCorpus.from_docs(docs, tokenizer, f"{name} ({split} split)")
        mask = MaskVocab.of(tokenizer, word_tables=self.whole_word) if self.masked else None
        kw = dict(cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id,
                  rank=rank, world_size=world_size, mask=mask, mask_prob=self.mask_prob, whole_word=self.whole_word)
        train = NextSentenceBatches(corpus(train_docs, "train"), data.batch_size, data.block_size, seed=seed, **kw)
        print(f"data: {train.corpus.n_docs:,} train documents, {train.corpus.n_sentences:,} sentences, "
              f"{len(train.corpus.firsts):,} with a next sentence ({name})")
        if not val_docs:
            return ObjectiveData(train, None)
        val = NextSentenceBatches(corpus(val_docs, "val"), data.batch_size, data.block_size, seed=12345, **kw)
        return ObjectiveData(train, lambda: (val.batch_at(i) for i in range(eval_batches)))

    def loss(self, model, batch):
        out = encoder_forward(model, batch, self.name, self._checked)
        return nsp_loss(_nsp_logits(out), batch["next_sentence_label"])                 # (B, 2), (B,)


class BertObjective(NextSentenceObjective):
    """BERT pretraining: NSP pairs whose tokens are also BERT-masked; L = L_mlm + L_nsp, one forward."""

    name = "bert"
    masked = True

    def loss(self, model, batch):
        out = encoder_forward(model, batch, self.name, self._checked)
        l_mlm, m_mlm = mlm_loss(out.logits, batch["labels"])                           # (B, T, V), (B, T)
        l_nsp, m_nsp = nsp_loss(_nsp_logits(out), batch["next_sentence_label"])        # (B, 2), (B,)
        loss = l_mlm + l_nsp
        return loss, {"loss": loss.item(), "mlm_loss": m_mlm["loss"], "mlm_acc": m_mlm["mlm_acc"],
                      "nsp_loss": m_nsp["loss"], "nsp_acc": m_nsp["nsp_acc"]}
