"""Masked language modelling (BERT): rebuild the tokens hidden behind [MASK] from both sides.

Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding". A set S of positions is selected (15% of the non-special tokens of each row); of
those, 80% are replaced by [MASK], 10% by a random non-special token, 10% are left unchanged. The
encoder sees the corrupted row x̃ and the loss is the mean negative log-likelihood over S only:

    L_mlm = −(1 / |S|) Σ_{i∈S} log softmax(W h_i(x̃))[x_i]

Masked-token accuracy = fraction of i ∈ S with argmax_v logits_i = x_i (the evaluation metric).

Selection is an exact count per row, as BERT's create_pretraining_data.py: n = max(1, round(p ·
#candidates)) positions, chosen uniformly by ranking random scores; candidates are all positions
whose id is not special (pad, cls, sep, eos, bos, unk, mask, or any special added token).

Whole-word masking (BERT's later release; Cui et al., 2019): words are ranked instead of tokens and
every piece of a chosen word is selected; a word is taken while the midpoint of its pieces in the
ranked order lies below n, so the expected selected fraction stays p. Word rule (`find_word_starts`):
- WordPiece vocabularies: a token continues the word iff it starts with "##";
- all others: a token starts a word iff its text begins with whitespace, or the previous token's
  text ends with whitespace, or the previous token is special, or it is first in the row. Token
  text is the vocabulary string with ByteLevel's Ġ/Ċ/ĉ/č and SentencePiece's ▁ read as whitespace.
  For a character tokenizer a word is thus a run of non-space characters (each space its own unit);
  for byte-level BPE, "Ġhello" "," is one word and "Ġworld" starts the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batches import WrappedBatches, check_layout
from .clm import IGNORE_INDEX

SPECIAL_TOKENS = {"mask": "[MASK]", "cls": "[CLS]", "sep": "[SEP]"}
_BYTE_LEVEL_SPACE = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "č": "\r"}  # bytes_to_unicode of 32, 10, 9, 13


@dataclass
class MaskVocab:
    """What the masking collator needs from a tokenizer: the [MASK] id, the vocabulary size, the ids
    never selected, and (for whole-word masking) per-id word tables `opens` / `closes` (V,) bool."""
    mask_id: int
    vocab_size: int
    special_ids: frozenset
    opens: Optional[torch.Tensor] = None      # (V,) id begins a word (whitespace first / not "##")
    closes: Optional[torch.Tensor] = None     # (V,) id ends with whitespace: the next id begins a word

    @classmethod
    def of(cls, tokenizer_or_vocab: Any, *, word_tables: bool = False) -> "MaskVocab":
        if isinstance(tokenizer_or_vocab, MaskVocab):
            vocab = tokenizer_or_vocab
            if word_tables and vocab.opens is None:
                raise ValueError("whole-word masking needs MaskVocab.opens/closes: build it with "
                                 "MaskVocab.of(tokenizer, word_tables=True) or pass word_starts")
            return vocab
        tok = tokenizer_or_vocab
        if getattr(tok, "mask_token_id", None) is None:
            raise ValueError(f"tokenizer has no mask_token (mask_token={getattr(tok, 'mask_token', None)!r}): "
                             "masked-LM objectives need a [MASK] token; expected a tokenizer with "
                             "special_tokens={'mask': '[MASK]', ...}")
        roles = [getattr(tok, f"{r}_token_id", None) for r in ("pad", "cls", "sep", "eos", "bos", "unk", "mask")]
        special = frozenset(int(i) for i in (set(getattr(tok, "special_ids", set())) | set(roles)) if i is not None)
        vocab = cls(int(tok.mask_token_id), int(tok.vocab_size), special)
        if word_tables:
            vocab.opens, vocab.closes = _word_tables(tok, vocab.vocab_size)
        return vocab

    def random_pool(self) -> torch.Tensor:
        """The ids a selected token may be replaced by (every non-special id)."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[[i for i in self.special_ids if i < self.vocab_size]] = False
        return keep.nonzero().squeeze(1)                                              # (V',)


def _word_tables(tok, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    backend = tok.backend
    kinds = {type(backend.decoder).__name__, type(backend.model).__name__, type(backend.pre_tokenizer).__name__}
    opens, closes = torch.zeros(vocab_size, dtype=torch.bool), torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(vocab_size):
        text = tok.id_to_token(i) or ""
        if "WordPiece" in kinds:
            opens[i] = not text.startswith("##")
            continue
        if "ByteLevel" in kinds:
            text = "".join(_BYTE_LEVEL_SPACE.get(c, c) for c in text)
        text = text.replace("▁", " ")
        opens[i], closes[i] = text[:1].isspace(), text[-1:].isspace()
    return opens, closes


def find_word_starts(input_ids: torch.Tensor, vocab: MaskVocab) -> torch.Tensor:
    """(B, T) bool: True where a new word begins (see the module docstring for the rule)."""
    ids = input_ids.clamp(0, vocab.vocab_size - 1)
    special = _special_mask(input_ids, vocab)                                         # (B, T)
    opens, closes = vocab.opens.to(ids.device), vocab.closes.to(ids.device)           # (V,), (V,)
    starts = opens[ids].clone()                                                       # (B, T)
    starts[:, 1:] |= closes[ids[:, :-1]] | special[:, :-1]
    starts[:, 0] = True
    return starts | special


def _special_mask(input_ids: torch.Tensor, vocab: MaskVocab) -> torch.Tensor:
    special = torch.tensor(sorted(vocab.special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, special)                                             # (B, T)


def mask_tokens(input_ids: torch.Tensor, tokenizer_or_ids: Any, *, mask_prob: float = 0.15,
                generator: torch.Generator, whole_word: bool = False,
                word_starts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, T) ids -> (inputs, labels), both (B, T); labels = original id at the
    selected positions, −100 elsewhere. `tokenizer_or_ids`: a Tokenizer or a MaskVocab."""
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob={mask_prob!r}: expected a probability in (0, 1)")
    vocab = MaskVocab.of(tokenizer_or_ids, word_tables=whole_word and word_starts is None)
    ids = input_ids
    B, T = ids.shape
    candidate = ~_special_mask(ids, vocab)                                            # (B, T)
    if whole_word:
        starts = word_starts if word_starts is not None else find_word_starts(ids, vocab)
        starts = starts.to(torch.bool) | ~candidate                                   # specials stand alone
        starts[:, 1:] |= ~candidate[:, :-1]
    else:
        starts = torch.ones_like(candidate)                                           # every token a word
    starts[:, 0] = True
    word = starts.long().cumsum(1) - 1                                                # (B, T) word index
    # One random score per word, shared by its pieces; non-candidates sort last.
    score = torch.rand(B, T, generator=generator).to(ids.device).gather(1, word)      # (B, T)
    score = score.masked_fill(~candidate, float("inf"))
    order = torch.sort(score, dim=1, stable=True).indices                            # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=ids.device).expand(B, T))
    first_rank = torch.full((B, T), T, dtype=torch.long, device=ids.device).scatter_reduce(
        1, word, rank, reduce="amin")                                                 # (B, words) rank of 1st piece
    length = torch.zeros((B, T), dtype=torch.long, device=ids.device).scatter_add(
        1, word, torch.ones_like(word))                                               # (B, words) pieces per word
    n_cand = candidate.sum(1, keepdim=True)                                           # (B, 1)
    target = torch.where(n_cand > 0, (n_cand.double() * mask_prob).round().clamp(min=1), 0.0)
    midpoint = first_rank.gather(1, word) + length.gather(1, word) / 2.0              # (B, T)
    selected = (midpoint < target) & candidate                                        # (B, T)

    labels = ids.masked_fill(~selected, IGNORE_INDEX)                                 # (B, T)
    u = torch.rand(B, T, generator=generator).to(ids.device)                          # 80 / 10 / 10 draw
    pool = vocab.random_pool().to(ids.device)
    random_ids = pool[torch.randint(len(pool), (B, T), generator=generator).to(ids.device)]
    inputs = torch.where(selected & (u < 0.8), torch.full_like(ids, vocab.mask_id), ids)
    inputs = torch.where(selected & (u >= 0.8) & (u < 0.9), random_ids, inputs)
    return inputs, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L_mlm and masked-token accuracy over the positions whose label is not −100.
    logits (B, T, V), labels (B, T). With no labelled position the loss is 0 (and mlm_acc 0)."""
    keep = labels != IGNORE_INDEX                                                     # (B, T)
    scored, targets = logits[keep].float(), labels[keep]                              # (N, V), (N,)
    if targets.numel() == 0:
        loss = logits.sum() * 0.0
        return loss, {"loss": 0.0, "mlm_acc": 0.0}
    loss = F.cross_entropy(scored, targets)
    acc = (scored.argmax(-1) == targets).float().mean().item()
    return loss, {"loss": loss.item(), "mlm_acc": acc}


def check_encoder(model, objective: str) -> None:
    """Encoder-only objectives need a bidirectional config: ModelConfig.causal must be False."""
    config = getattr(model, "config", None)
    inner = model
    while config is None and hasattr(inner, "module"):                               # DDP / compiled wrappers
        inner = inner.module
        config = getattr(inner, "config", None)
    if config is not None:
        check_encoder_config(config, objective)


def check_encoder_config(config, objective: str) -> None:
    if config.is_encoder_decoder:
        raise ValueError(f"objective {objective!r} trains a bidirectional encoder, but the model config is an "
                         "encoder-decoder (ModelConfig.is_encoder_decoder=True); expected an encoder-only "
                         "config such as preset bert-tiny")
    if config.causal:
        raise ValueError(f"objective {objective!r} trains a bidirectional encoder, but ModelConfig.causal=True "
                         f"(family {config.family!r} is causal-only); expected causal=False, e.g. preset bert-tiny")


def encoder_forward(model, batch: dict, objective: str, checked: set):
    """model(input_ids, attention_mask, token_type_ids) after a one-time check of its config."""
    if id(model) not in checked:
        check_encoder(model, objective)
        checked.add(id(model))
    extra = {"token_type_ids": batch["token_type_ids"]} if batch.get("token_type_ids") is not None else {}
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra)


def mask_generator(seed: int, step: int) -> torch.Generator:
    """The masking RNG of batch `step`: a pure function of (seed, step), so resume is exact."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, 1]).integers(2 ** 62)))


def require_roles(tokenizer, roles=("mask", "cls", "sep")) -> None:
    missing = [f"{r}_token" for r in roles if getattr(tokenizer, f"{r}_token_id", None) is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)}: expected the special tokens {SPECIAL_TOKENS}")


class MaskedWindowBatches(WrappedBatches):
    """BERT inputs from a window loader: each GLOBAL window batch (the inner loader runs with
    world_size=1) of block_size − 2 tokens becomes [CLS] w [SEP] (block_size), is masked with
    `mask_generator(seed, step)`, and rank r keeps rows r::world_size. Batches: {"input_ids",
    "labels"} (b, block_size). State: {"step", "windows": inner state} -> exact resume."""
    _config_keys = ("seed", "mask_prob", "whole_word")

    def __init__(self, windows, vocab: MaskVocab, cls_id: int, sep_id: int, *, mask_prob: float = 0.15,
                 whole_word: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        check_layout(windows.batch_size, windows.block_size, rank, world_size, seed)
        self.windows, self.vocab, self.cls_id, self.sep_id = windows, vocab, cls_id, sep_id
        self.mask_prob, self.whole_word, self.seed = mask_prob, whole_word, seed
        self.rank, self.world_size, self.step = rank, world_size, 0

    def _make(self, window_batch: dict, step: int) -> dict:
        w = window_batch["input_ids"]                                                 # (B, T - 2)
        B = w.shape[0]
        ids = torch.cat([torch.full((B, 1), self.cls_id), w, torch.full((B, 1), self.sep_id)], 1)  # (B, T)
        inputs, labels = mask_tokens(ids, self.vocab, mask_prob=self.mask_prob, whole_word=self.whole_word,
                                     generator=mask_generator(self.seed, step))
        r, n = self.rank, self.world_size
        return {"input_ids": inputs[r::n].contiguous(), "labels": labels[r::n].contiguous()}


class MaskedLMObjective:
    """MLM over the token shards (as CLM): random (or packed) windows wrapped as [CLS] w [SEP] and
    BERT-masked per batch. Trains `masked_lm` (MaskedLM) or `pretraining` (MaskedLM + NSP head);
    the config check (ModelConfig.causal must be False) runs in `build_model` and on the first loss
    call for each model, so a causal config fails before (or at) the first step."""

    name = "mlm"
    task = "masked_lm"
    tasks = ("masked_lm", "pretraining")
    special_tokens = dict(SPECIAL_TOKENS)

    def __init__(self, mask_prob: float = 0.15, whole_word: bool = False):
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob={mask_prob!r}: expected a probability in (0, 1)")
        self.mask_prob, self.whole_word = mask_prob, whole_word
        self._checked: set = set()

    def build_model(self, config):
        from ..model import build_model
        check_encoder_config(config, self.name)
        return build_model(config, self.task)

    def make_data(self, source, tokenizer, data, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  eval_batches: int = 20):
        from ..data import PackedBatches, RandomWindowBatches
        from .base import ObjectiveData, token_shards

        require_roles(tokenizer)
        if data.block_size < 3:
            raise ValueError(f"data.block_size={data.block_size}: MLM needs at least 3 ([CLS] w [SEP])")
        vocab = MaskVocab.of(tokenizer, word_tables=self.whole_word)
        train_tokens, val_tokens = token_shards(source, tokenizer, data, rank)
        width = data.block_size - 2
        loader = RandomWindowBatches if data.sampling == "random" else PackedBatches
        kw = dict(mask_prob=self.mask_prob, whole_word=self.whole_word, rank=rank, world_size=world_size)
        ids = (tokenizer.cls_token_id, tokenizer.sep_token_id)
        train = MaskedWindowBatches(loader(train_tokens, data.batch_size, width, seed=seed),
                                    vocab, *ids, seed=seed, **kw)
        if data.val_fraction <= 0:
            return ObjectiveData(train, None)
        val = MaskedWindowBatches(RandomWindowBatches(val_tokens, data.batch_size, width, seed=12345),
                                  vocab, *ids, seed=12345, **kw)
        return ObjectiveData(train, lambda: (val.batch_at(i) for i in range(eval_batches)))

    def loss(self, model, batch):
        out = encoder_forward(model, batch, self.name, self._checked)
        return mlm_loss(out.logits, batch["labels"])                                  # (B, T, V), (B, T)
