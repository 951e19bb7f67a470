"""SFT examples and batches: a token sequence with a response mask, cut into inputs and pre-shifted
targets (-100 where the next token is not a response token), so that the causal-LM loss is the
SFT loss over response tokens only:

    L = -(1 / |R|) sum_{t in R} log P(x_t | x_<t),   R = response positions

Shared by `finetune.sft` (chat-template rows) and `align.cai` (SL-CAI revisions): the jobs never
import each other, so the format lives here, beside `clm_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.epochs import EpochBatches
from ..data.errors import DataError
from .clm import IGNORE_INDEX, clm_loss

__all__ = ["SFTExample", "SFTBatches", "pack", "sft_loss"]

sft_loss = clm_loss    # the same cross-entropy; the masking lives in the targets


@dataclass
class SFTExample:
    ids: list[int]          # the whole conversation, (L,)
    mask: list[int]         # 1 where ids[t] is a response token (a loss target), (L,)
    where: str = ""

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        """input_ids = ids[:-1]; targets[t] = ids[t + 1] where that token is a response token."""
        targets = [tok if m else IGNORE_INDEX for tok, m in zip(self.ids[1:], self.mask[1:])]
        return self.ids[:-1], targets


# ---- batches ---------------------------------------------------------------------------------
def pack(examples: list[SFTExample], row_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """Greedy packing in the given order: each row holds whole examples (inputs+targets pairs)
    whose total length fits row_len."""
    rows, current, used = [], [], 0
    for ex in examples:
        inputs, targets = ex.inputs_and_targets()
        if current and used + len(inputs) > row_len:
            rows.append(current)
            current, used = [], 0
        current.append((inputs, targets))
        used += len(inputs)
    if current:
        rows.append(current)
    return rows


class SFTBatches(EpochBatches):
    """Seeded epochs over SFT examples (see llmkit.data.epochs).

    Padded (default): each batch is right-padded to its longest example, with "attention_mask".
    packing=True: examples are packed into rows of max_len - 1 tokens once (in a seeded order);
    each batch carries "position_ids" and "doc_ids" so every example sees only itself.
    """

    def __init__(self, examples: list[SFTExample], batch_size: int, pad_token_id: int, *, packing: bool = False,
                 max_len: int = 0, shuffle: bool = True, seed: int = 0):
        if not examples:
            raise DataError("SFTBatches: no examples")
        if packing:
            order = np.random.default_rng([seed, 7]).permutation(len(examples)) if shuffle else range(len(examples))
            items = pack([examples[i] for i in order], max_len - 1)
        else:
            items = [[ex.inputs_and_targets()] for ex in examples]
        super().__init__(items, batch_size, shuffle=shuffle, seed=seed)
        self.pad, self.packing = pad_token_id, packing
        self.row_len = max_len - 1 if packing else None

    def collate(self, items) -> dict:
        width = self.row_len or max(len(inp) for item in items for inp, _ in item)
        B = len(items)
        input_ids = torch.full((B, width), self.pad, dtype=torch.long)                     # (B, T)
        targets = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)                   # (B, T)
        attention = torch.zeros((B, width), dtype=torch.long)                              # (B, T)
        positions = torch.zeros((B, width), dtype=torch.long)                              # (B, T)
        docs = torch.zeros((B, width), dtype=torch.long)                                   # (B, T)
        for b, item in enumerate(items):
            pos = 0
            for d, (inputs, tgt) in enumerate(item):
                n = len(inputs)
                input_ids[b, pos:pos + n] = torch.tensor(inputs)
                targets[b, pos:pos + n] = torch.tensor(tgt)
                attention[b, pos:pos + n] = 1
                positions[b, pos:pos + n] = torch.arange(n)
                docs[b, pos:pos + n] = d
                pos += n
            docs[b, pos:] = len(item)                     # packed padding: a segment of its own
            positions[b, pos:] = torch.arange(width - pos)
        if self.packing:
            return {"input_ids": input_ids, "targets": targets, "position_ids": positions, "doc_ids": docs}
        return {"input_ids": input_ids, "targets": targets, "attention_mask": attention}
