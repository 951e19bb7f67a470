"""Data for the contrastive objective: sentence pairs from a source, and a resumable pair loader.

Three kinds of source (`read_examples(..., mode="auto")` tells them apart by their fields):

- **pairs**: rows with two text columns, anchor and positive (and optionally a negative), from a
  jsonl / json / tsv / csv file, a list of dicts, or a list of (anchor, positive[, negative]) tuples;
- **labels**: rows with a text column and a label column (SST-2's `sentence` + `label`): the positive
  of sentence i is another sentence with the same label, its negative one with a different label;
- **texts**: plain documents (any `iter_texts` source) for SimCSE: each sentence is its own positive
  and the model's dropout makes the two views (Gao et al., 2021).

`ContrastiveBatches` yields {"input_ids", "attention_mask"} of shape (b, k, T), k = views per row
(1: SimCSE, the loss encodes it twice; 2: anchor, positive; 3: anchor, positive, negative), plus
"labels" (b,) for labelled data. Step s draws its global batch from a generator seeded by (seed, s),
so a batch is a pure function of the step and the state is {"step": s}; rank r keeps rows
r::world_size of it. Texts are tokenized with the project's Tokenizer, truncated to block_size
(keeping a final special token such as [SEP]) and right-padded to the longest view in the batch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data import iter_texts
from ..data.batches import StepBatches
from ..data.errors import DataError
from ..data.readers import read_records
from ..data.sources import is_file_source, resolve_paths

MODES = ("auto", "pairs", "labels", "texts")
_ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".tsv", ".csv")


@dataclass
class ContrastiveExamples:
    """Sentences and how they pair up; `mode` is "pairs", "labels" or "texts"."""
    mode: str
    texts: list                                # anchors (every sentence, in "labels" / "texts")
    positives: Optional[list] = None           # "pairs": positives[i] goes with texts[i]
    negatives: Optional[list] = None           # "pairs" with a negative column
    labels: Optional[list] = None              # "labels": the label of texts[i]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> "ContrastiveExamples":
        take = (lambda xs: None if xs is None else [xs[i] for i in index])
        return replace(self, texts=take(self.texts), positives=take(self.positives),
                       negatives=take(self.negatives), labels=take(self.labels))


def load_rows(source: Any, *, text_field: str = "text", split_lines: Any = True) -> list:
    """Rows (dicts) of table files (jsonl / json / tsv / csv), the strings of text files, or the
    items of an in-memory source (dicts, tuples or strings; an HF Dataset gives its row dicts)."""
    if is_file_source(source):
        paths = resolve_paths(source)
        tables = [p.name.lower().endswith(_ROW_SUFFIXES) for p in paths]
        if all(tables):
            return [row for path in paths for row in read_records(path)[0]]
        if any(tables):
            raise DataError(f"contrastive source mixes table files and text files ({[str(p) for p in paths][:4]}); "
                            "expected one kind")
        return list(iter_texts(source, text_field=text_field, split_lines=split_lines))
    if hasattr(source, "column_names"):                       # an HF datasets.Dataset
        return [dict(row) for row in source]
    return list(source)


def read_examples(source: Any, *, mode: str = "auto", text_field: str = "text", label_field: str = "label",
                  anchor_field: str = "anchor", positive_field: str = "positive",
                  negative_field: str = "negative", split_lines: Any = True) -> ContrastiveExamples:
    """Read a source into ContrastiveExamples; "auto" picks pairs (anchor + positive fields or
    tuples), labels (text + label fields) or texts (strings, or rows with only the text field)."""
    if mode not in MODES:
        raise DataError(f"mode={mode!r}: expected one of {list(MODES)}")
    rows = load_rows(source, text_field=text_field, split_lines=split_lines)
    if not rows:
        raise DataError("contrastive source: no rows; expected sentence pairs, labelled sentences or texts")
    first = rows[0]
    if mode == "auto":
        if isinstance(first, (tuple, list)) or (isinstance(first, dict) and anchor_field in first
                                                 and positive_field in first):
            mode = "pairs"
        elif isinstance(first, dict) and label_field in first:
            mode = "labels"
        else:
            mode = "texts"
    if mode == "pairs":
        if isinstance(first, (tuple, list)):
            if not all(len(r) in (2, 3) for r in rows):
                raise DataError("pairs: expected (anchor, positive) or (anchor, positive, negative) tuples")
            rows = [dict(zip((anchor_field, positive_field, negative_field), r)) for r in rows]
        anchors, positives = _column(rows, anchor_field), _column(rows, positive_field)
        negatives = _column(rows, negative_field) if negative_field in rows[0] else None
        return ContrastiveExamples("pairs", anchors, positives, negatives)
    if mode == "labels":
        texts, labels = _column(rows, text_field), _column(rows, label_field, text=False)
        check_labels(labels, f"labels: column {label_field!r}")
        return ContrastiveExamples("labels", texts, labels=labels)
    texts = [r if isinstance(r, str) else (r.get(text_field) if isinstance(r, dict) else None) for r in rows]
    if any(not isinstance(t, str) for t in texts):
        raise DataError(f"texts: expected strings or rows with a {text_field!r} text field, got {first!r:.80}")
    return ContrastiveExamples("texts", [t for t in texts if t])


def check_labels(labels: Sequence, where: str) -> None:
    """At least two labels (negatives differ in label), each on at least two sentences (positives)."""
    counts = Counter(labels)
    if len(counts) < 2:
        raise DataError(f"{where} holds one label ({next(iter(counts))!r}); expected at least two, so that "
                        "negatives have a different label")
    lonely = [y for y, c in counts.items() if c < 2]
    if lonely:
        raise DataError(f"{where}: label {lonely[0]!r} has a single sentence; expected at least two per label, "
                        "so that each sentence has a positive with its label")


def pairable(examples: ContrastiveExamples) -> Optional[ContrastiveExamples]:
    """Labelled rows whose label has another sentence (a held-out split may leave one alone), or None
    when fewer than two labels remain; other modes pass through."""
    if examples.labels is None:
        return examples
    counts = Counter(examples.labels)
    keep = [i for i, y in enumerate(examples.labels) if counts[y] >= 2]
    if len({examples.labels[i] for i in keep}) < 2:
        return None
    return examples.subset(keep)


def _column(rows: list, field: str, text: bool = True) -> list:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or field not in row:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"row {i}: missing field {field!r} (has {got}); expected the text field "
                            "(data.text_field) or the objective's label / anchor / positive / negative field")
        value = row[field]
        if text and (not isinstance(value, str) or not value):
            raise DataError(f"row {i}: field {field!r} must be a non-empty string, got {value!r}")
        out.append(value)
    return out


def split_examples(examples: ContrastiveExamples, val_fraction: float, seed: int = 0):
    """(train, val): a seeded random `val_fraction` of the rows held out (None when 0)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction!r}: expected a fraction in [0, 1)")
    order = np.random.default_rng([seed, 7]).permutation(len(examples))
    n_val = int(round(val_fraction * len(examples)))
    if n_val == 0:
        return examples, None
    return examples.subset(order[n_val:].tolist()), examples.subset(sorted(order[:n_val].tolist()))


def perturb(text: str, rng: np.random.Generator, drop: float = 0.15, swaps: int = 1) -> str:
    """A lightly perturbed copy: each word dropped with probability `drop` (one is kept), then
    `swaps` random adjacent words exchanged. Used for held-out retrieval pairs of plain texts."""
    words = text.split()
    kept = [w for w in words if rng.random() >= drop] or words[:1]
    for _ in range(swaps if len(kept) > 1 else 0):
        i = int(rng.integers(0, len(kept) - 1))
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


def perturbed_pairs(examples: ContrastiveExamples, seed: int = 0) -> ContrastiveExamples:
    """texts -> pairs (text, perturb(text)), fixed by `seed`: SimCSE's held-out retrieval set."""
    rng = np.random.default_rng([seed, 11])
    return ContrastiveExamples("pairs", list(examples.texts), [perturb(t, rng) for t in examples.texts])


def pad_views(views: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """b rows of k token lists -> input_ids, attention_mask (b, k, T), right-padded to the longest."""
    T = max(len(ids) for row in views for ids in row)
    b, k = len(views), len(views[0])
    input_ids = torch.full((b, k, T), pad_id, dtype=torch.long)                      # (b, k, T)
    mask = torch.zeros((b, k, T), dtype=torch.long)                                  # (b, k, T)
    for i, row in enumerate(views):
        for j, ids in enumerate(row):
            input_ids[i, j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, j, :len(ids)] = 1
    return input_ids, mask


def encode_truncated(tokenizer, texts: list, block_size: int) -> list:
    """Token ids per text, at most block_size of them; a final special token ([SEP]) is kept."""
    out = []
    special = getattr(tokenizer, "special_ids", set())
    for ids in tokenizer.encode_batch(list(texts)):
        if len(ids) > block_size:
            ids = ids[:block_size - 1] + ids[-1:] if ids[-1] in special and block_size > 1 else ids[:block_size]
        out.append(ids or [tokenizer.pad_id])
    return out


class ContrastiveBatches(StepBatches):
    """Endless seeded batches of views (see the module docstring); `negatives=True` adds a third view:
    the row's negative column, a different-label sentence, or another row's positive (texts: another
    text). Held-out batches: `batch_at(step)` never touches the state."""
    _config_keys = ("seed", "batch_size", "block_size", "negatives")

    def __init__(self, examples: ContrastiveExamples, tokenizer, batch_size: int, block_size: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, negatives: bool = False):
        self._setup(batch_size, block_size, seed, rank, world_size, False, None)
        if len(examples) < 2:
            raise DataError(f"contrastive data: {len(examples)} example(s); expected at least 2")
        self.examples, self.tokenizer, self.negatives = examples, tokenizer, bool(negatives)
        self.pad_id = tokenizer.pad_id
        self.step = 0
        if examples.labels is not None:
            check_labels(examples.labels, "contrastive data")
            self.label_ids = sorted(set(examples.labels), key=str)
            self.by_label = {y: np.array([i for i, v in enumerate(examples.labels) if v == y])
                             for y in self.label_ids}
            self.not_label = {y: np.array([i for i, v in enumerate(examples.labels) if v != y])
                              for y in self.label_ids}

    def _other(self, rng, i: int, pool: np.ndarray) -> int:
        """A random member of `pool` other than i."""
        j = int(pool[rng.integers(0, len(pool))])
        while j == i:
            j = int(pool[rng.integers(0, len(pool))])
        return j

    def rows_at(self, step: int) -> list:
        """The global batch of `step` as text rows [[anchor, positive?, negative?], ...], plus labels."""
        ex, n = self.examples, len(self.examples)
        rng = np.random.default_rng([self.seed, int(step)])
        idx = rng.choice(n, size=self.batch_size, replace=n < self.batch_size)
        everyone = np.arange(n)
        rows = []
        for i in map(int, idx):
            row = [ex.texts[i]]
            if ex.mode == "pairs":
                row.append(ex.positives[i])
            elif ex.mode == "labels":
                row.append(ex.texts[self._other(rng, i, self.by_label[ex.labels[i]])])
            if self.negatives:
                if ex.mode == "pairs":
                    row.append(ex.negatives[i] if ex.negatives is not None
                               else ex.positives[self._other(rng, i, everyone)])
                elif ex.mode == "labels":
                    others = self.not_label[ex.labels[i]]
                    row.append(ex.texts[int(others[rng.integers(0, len(others))])])
                else:                                  # SimCSE + negative: (text, text, other text)
                    row += [ex.texts[i], ex.texts[self._other(rng, i, everyone)]]
            rows.append(row)
        labels = [self.label_ids.index(ex.labels[i]) for i in idx] if ex.labels is not None else None
        return rows, labels

    def batch_at(self, step: int) -> dict:
        rows, labels = self.rows_at(step)
        rows = rows[self.rank::self.world_size]                                       # this rank's rows
        k = len(rows[0])
        flat = encode_truncated(self.tokenizer, [t for row in rows for t in row], self.block_size)
        input_ids, mask = pad_views([flat[i * k:(i + 1) * k] for i in range(len(rows))], self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": mask}                      # (b, k, T) each
        if labels is not None:
            batch["labels"] = torch.tensor(labels[self.rank::self.world_size], dtype=torch.long)  # (b,)
        return batch
