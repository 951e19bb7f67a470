"""Denoising autoencoder pretraining: an encoder-decoder rebuilds the original text x from a
corrupted x̃ (BART, Lewis et al. 2020; denoising autoencoders, Vincent et al. 2008).

Token form (the default), teacher-forced reconstruction cross-entropy over the N non-ignored
label positions, y = (x_1 … x_n, </s>):

    L = −(1 / N) Σ_t log P(y_t | y_<t, x̃),   P(· | y_<t, x̃) = softmax(W_lm h^dec_t)

and the metric dae_acc = (1 / N) Σ_t [argmax_v P(v | y_<t, x̃) = y_t].

Continuous form (`continuous=True`, for embeddings or feature vectors): the decoder's output
state ĥ_t (optionally through a projection) regresses the ORIGINAL input vector x_t,

    L = (1 / N) Σ_t ‖x_t − x̂_t‖²₂,   x̂_t = P ĥ_t  (P = identity unless the model has `dae_projection`)

For token data the target x_t is the shared token embedding of y_t, scaled like the model's input
(`embed_tokens(y_t) · embed_scale`) and DETACHED, so the loss cannot shrink the target. For
feature data (batches with "input_features") the targets are the features themselves.

Batch (see `DenoisingCollator`): "input_ids" (B, S) = x̃ + </s>, padded; "attention_mask" (B, S);
"labels" (B, T) = x + </s>, −100 on pad; "decoder_input_ids" (B, T) = shift-right of labels with
the decoder start token (</s>, as BART); "decoder_attention_mask" (B, T).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batches import PackedBatches, RandomWindowBatches, WrappedBatches, check_layout
from .clm import IGNORE_INDEX
from .noise import apply_noise, check_noise

SENTENCE_END_CHARS = ".!?"


def _config_of(model):
    return getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)


def require_encoder_decoder(model_or_config, objective: str = "dae") -> None:
    """A clear error unless the model (or config) is an encoder-decoder."""
    config = model_or_config if hasattr(model_or_config, "is_encoder_decoder") else _config_of(model_or_config)
    if config is None or not getattr(config, "is_encoder_decoder", False):
        family = getattr(config, "family", type(model_or_config).__name__)
        raise ValueError(f"objective {objective!r} needs an encoder-decoder model: ModelConfig.is_encoder_decoder="
                         f"{getattr(config, 'is_encoder_decoder', None)!r} (family {family!r}); expected True, "
                         "e.g. model.preset: bart-tiny")


# ---- losses on plain tensors ----------------------------------------------------------------------
def dae_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not −100; logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def reconstruction_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of non-ignored positions where the teacher-forced argmax equals the label."""
    scored = labels != IGNORE_INDEX                                                # (B, T)
    hits = (logits.argmax(-1) == labels) & scored                                  # (B, T)
    return float(hits.sum()) / max(int(scored.sum()), 1)


def continuous_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L = (1 / N) Σ_{b,t} m_bt ‖target_bt − pred_bt‖²₂ with N = Σ m_bt: the squared L2 error summed
    over the feature axis, averaged over the (unmasked) positions. pred, target (B, T, d) or (T, d);
    mask (B, T) / (T,), 1 = scored (default: all)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)}: expected the same shape")
    per_position = (target.float() - pred.float()).pow(2).sum(-1)                 # (B, T)
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)                                            # (B, T)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


# ---- collator --------------------------------------------------------------------------------------
def row_generator(seed: int, step: int, row: int) -> torch.Generator:
    """The generator of the noise for global row `row` of batch `step`: a pure function of the three,
    so resumed runs and any world size corrupt each row identically."""
    state = np.random.SeedSequence([int(seed), int(step), int(row), 0xDAE]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def pad_sequences(sequences: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-D tensors into (B, L_max)."""
    out = torch.full((len(sequences), max((len(s) for s in sequences), default=0)), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = s
    return out


class DenoisingCollator:
    """Original token sequences -> a denoising batch (module docstring). `max_length` caps the
    encoder input and the labels (</s> included), i.e. the model's sequence length."""

    def __init__(self, *, eos_token_id: int, pad_token_id: int, mask_token_id: Optional[int] = None,
                 decoder_start_token_id: Optional[int] = None,
                 noise: Sequence[str] = ("span_infilling", "sentence_permutation"), mask_ratio: float = 0.3,
                 poisson_lambda: float = 3.0, sentence_end_ids: Sequence[int] = (),
                 max_length: Optional[int] = None):
        self.noise = check_noise(noise)
        if mask_token_id is None and {"token_masking", "span_infilling"} & set(self.noise):
            raise ValueError(f"noise={list(self.noise)} needs mask_token_id: expected the id of the "
                             "tokenizer's 'mask' role (e.g. '<mask>')")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r}: expected a fraction in [0, 1]")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length!r}: expected at least 2 (a token and </s>)")
        self.eos, self.pad, self.mask = eos_token_id, pad_token_id, mask_token_id
        self.start = eos_token_id if decoder_start_token_id is None else decoder_start_token_id
        self.mask_ratio, self.poisson_lambda = float(mask_ratio), float(poisson_lambda)
        self.sentence_end_ids = tuple(sorted(set(sentence_end_ids) | {eos_token_id}))
        self.max_length = max_length

    def corrupt(self, tokens, generator: torch.Generator) -> torch.Tensor:
        """x̃ for one original sequence x (1-D)."""
        return apply_noise(tokens, self.noise, generator, mask_id=self.mask, mask_ratio=self.mask_ratio,
                           poisson_lambda=self.poisson_lambda, sentence_end_ids=self.sentence_end_ids)

    def collate(self, originals: Sequence[torch.Tensor], corrupted: Sequence[torch.Tensor]) -> dict:
        """The batch from (x, x̃) pairs: no randomness here."""
        eos = torch.tensor([self.eos])
        cap = self.max_length - 1 if self.max_length is not None else None
        inputs = [torch.cat([torch.as_tensor(c, dtype=torch.long)[:cap], eos]) for c in corrupted]
        targets = [torch.cat([torch.as_tensor(o, dtype=torch.long)[:cap], eos]) for o in originals]
        input_ids = pad_sequences(inputs, self.pad)                                # (B, S)
        labels = pad_sequences(targets, IGNORE_INDEX)                              # (B, T)
        decoder_input_ids = torch.full_like(labels, self.start)                    # (B, T)
        decoder_input_ids[:, 1:] = labels[:, :-1]
        decoder_input_ids.masked_fill_(decoder_input_ids == IGNORE_INDEX, self.pad)
        lengths = torch.tensor([len(s) for s in inputs])
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()  # (B, S)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": (labels != IGNORE_INDEX).long()}           # (B, T)

    def __call__(self, sequences, *, seed: int = 0, step: int = 0, rows: Optional[Sequence[int]] = None) -> dict:
        """Corrupt row i with `row_generator(seed, step, rows[i])` (rows default 0..B-1) and collate."""
        originals = [torch.as_tensor(np.asarray(s), dtype=torch.long) for s in sequences]
        rows = range(len(originals)) if rows is None else rows
        corrupted = [self.corrupt(x, row_generator(seed, step, r)) for x, r in zip(originals, rows)]
        return self.collate(originals, corrupted)


# ---- data ------------------------------------------------------------------------------------------
class DenoisingBatches(WrappedBatches):
    """Endless denoising batches over a token stream: each step takes one GLOBAL batch of
    `batch_size` windows of `length` tokens (random windows, or shuffled consecutive blocks with
    sampling="packed", via llmkit.data's loaders), rank r keeps rows r::world_size, and row j is
    corrupted with row_generator(seed, step, j). State: {"step", "windows": the window loader's}."""
    _config_keys = ("seed",)

    def __init__(self, tokens, collator: DenoisingCollator, batch_size: int, length: int, *,
                 sampling: str = "random", seed: int = 0, rank: int = 0, world_size: int = 1):
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"length={length!r}: expected an int >= 2 (tokens per window)")
        check_layout(batch_size, length - 1, rank, world_size, seed)
        if sampling not in ("random", "packed"):
            raise ValueError(f"sampling={sampling!r}: expected 'random' or 'packed'")
        loader = RandomWindowBatches if sampling == "random" else PackedBatches
        # A window loader's rows are (block + 1) tokens: input_ids plus the last target.
        self.windows = loader(tokens, batch_size, length - 1, seed=seed)
        self.collator, self.seed, self.rank, self.world_size = collator, int(seed), int(rank), int(world_size)
        self.step = 0

    def _make(self, raw: dict, step: int) -> dict:
        windows = torch.cat([raw["input_ids"], raw["targets"][:, -1:]], dim=1)     # (batch_size, length)
        rows = list(range(self.rank, windows.shape[0], self.world_size))
        return self.collator(windows[rows], seed=self.seed, step=step, rows=rows)


def sentence_end_ids(tokenizer, chars: str = SENTENCE_END_CHARS) -> list[int]:
    """Ids of the tokens whose text (whitespace stripped) ends in one of `chars`, plus EOS."""
    ends = [i for i in range(tokenizer.vocab_size)
            if (text := tokenizer.decode([i], skip_special_tokens=True).strip()) and text[-1] in chars]
    return ends + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


# ---- the objective ---------------------------------------------------------------------------------
class DenoisingObjective:
    """`objective: dae`: BART-style denoising over windows of the token stream (block_size tokens
    with </s>, so labels and inputs fit the model's max_seq_len = data.block_size)."""

    name = "dae"
    task = "seq2seq_lm"
    tasks = ("seq2seq_lm",)
    special_tokens = {"mask": "<mask>"}

    def __init__(self, noise: Sequence[str] = ("span_infilling", "sentence_permutation"), mask_ratio: float = 0.3,
                 poisson_lambda: float = 3.0, continuous: bool = False, sentence_end_chars: str = SENTENCE_END_CHARS):
        self.noise = check_noise(noise)
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r}: expected a fraction in [0, 1]")
        if poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda={poisson_lambda!r}: expected a positive rate")
        self.mask_ratio, self.poisson_lambda = float(mask_ratio), float(poisson_lambda)
        self.continuous, self.sentence_end_chars = bool(continuous), sentence_end_chars
        self.token_ids: dict = {}                  # filled by make_data, used by build_model

    def make_collator(self, tokenizer, max_length: Optional[int] = None) -> DenoisingCollator:
        needs_mask = bool({"token_masking", "span_infilling"} & set(self.noise))
        missing = [r for r in ("eos", "pad") + (("mask",) if needs_mask else ())
                   if getattr(tokenizer, f"{r}_token_id") is None]
        if missing:
            raise ValueError(f"objective 'dae' with noise={list(self.noise)}: the tokenizer has no "
                             f"{', '.join(r + '_token' for r in missing)}; expected a vocabulary with those roles")
        self.token_ids = {"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                          "bos": tokenizer.bos_token_id}
        ends = sentence_end_ids(tokenizer, self.sentence_end_chars) if "sentence_permutation" in self.noise else ()
        return DenoisingCollator(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 mask_token_id=tokenizer.mask_token_id, noise=self.noise, mask_ratio=self.mask_ratio,
                                 poisson_lambda=self.poisson_lambda, sentence_end_ids=ends, max_length=max_length)

    def make_data(self, source, tokenizer, data, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  eval_batches: int = 20):
        from .base import ObjectiveData, token_shards

        collator = self.make_collator(tokenizer, max_length=data.block_size)
        train_tokens, val_tokens = token_shards(source, tokenizer, data, rank)
        length = data.block_size - 1               # + </s> = block_size labels
        train = DenoisingBatches(train_tokens, collator, data.batch_size, length,
                                 sampling=data.sampling, seed=seed, rank=rank, world_size=world_size)
        val = DenoisingBatches(val_tokens, collator, data.batch_size, length, seed=12345,
                               rank=rank, world_size=world_size)
        return ObjectiveData(train, lambda: (val.batch_at(i) for i in range(eval_batches)))

    def build_model(self, config):
        """A Seq2SeqLM whose special ids match the tokenizer make_data saw (decoder start = </s>)."""
        from ..model import build_model
        require_encoder_decoder(config)
        if self.token_ids:
            config = config.replace(eos_token_id=self.token_ids["eos"], pad_token_id=self.token_ids["pad"],
                                    decoder_start_token_id=self.token_ids["eos"], bos_token_id=self.token_ids["bos"])
        return build_model(config, self.task)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        require_encoder_decoder(model)
        if "input_features" in batch:
            return feature_dae_loss(model, batch)
        labels = batch["labels"]                                                   # (B, T)
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    decoder_input_ids=batch["decoder_input_ids"],
                    decoder_attention_mask=batch.get("decoder_attention_mask"))
        accuracy = reconstruction_accuracy(out.logits, labels)
        if not self.continuous:
            loss = dae_loss(out.logits, labels)
        else:
            loss = token_continuous_loss(model, out.last_hidden_state, labels)
        return loss, {"loss": loss.item(), "dae_acc": accuracy}


def _stack(model):
    return getattr(model, "module", model).transformer                             # EncoderDecoder


def token_continuous_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """‖x_t − x̂_t‖² against the detached input embedding of the original token y_t; hidden (B, T, d)."""
    stack = _stack(model)
    with torch.no_grad():
        target = stack.embed_tokens(labels.clamp_min(0)) * stack.embed_scale      # (B, T, d)
    projection = getattr(getattr(model, "module", model), "dae_projection", None)
    pred = projection(hidden) if projection is not None else hidden               # (B, T, d)
    return continuous_reconstruction_loss(pred, target, labels != IGNORE_INDEX)


def feature_dae_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Continuous DAE on feature vectors: "input_features" (B, S, d) corrupted x̃, "attention_mask"
    (B, S), "target_features" (B, T, d) original x, optional "target_mask" (B, T). The encoder reads
    x̃ as inputs_embeds; the decoder is teacher-forced on [0, x_1 … x_{T-1}] and its states regress
    x (continuous_reconstruction_loss). Calls the stacks directly: single-process (not DDP) use."""
    stack = _stack(model)
    x_tilde, target = batch["input_features"], batch["target_features"]           # (B, S, d), (B, T, d)
    mask, target_mask = batch.get("attention_mask"), batch.get("target_mask")
    memory = stack.encoder(attention_mask=mask, inputs_embeds=x_tilde).last_hidden_state  # (B, S, d)
    decoder_in = torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]], dim=1)      # (B, T, d)
    hidden = stack.decoder(attention_mask=target_mask, inputs_embeds=decoder_in, memory=memory,
                           memory_attention_mask=mask).last_hidden_state                 # (B, T, d)
    projection = getattr(getattr(model, "module", model), "dae_projection", None)
    pred = projection(hidden) if projection is not None else hidden
    loss = continuous_reconstruction_loss(pred, target, target_mask)
    return loss, {"loss": loss.item()}
