"""Masked multimodal language modelling: predict masked caption tokens from the text AND an image.

One bidirectional encoder reads the concatenation [X_masked ; Y] of the caption tokens and the
non-text features Y (UNITER, Chen et al., 2020, "UNITER: UNiversal Image-TExt Representation
Learning"; ViLBERT, Lu et al., 2019, uses two streams, we use UNITER's single stream):

    Y = E_patch(patches(I)) + m_img        patches: (B, C, H, W) -> (B, P, C·p·p), P = (H/p)(W/p)
      or W_f F + m_img                     precomputed features F: (B, N, feature_dim)
    X = E_tok(x_masked) + m_txt
    H = Encoder([X ; Y] + positions)       (B, T + P, d), full (non-causal) attention
    L = −(1/|M|) Σ_{i ∈ M} log softmax(MLMHead(H_i))[x_i]     M = the masked text positions

so a masked colour or shape word of "a [MASK] circle at the top left" is only recoverable through Y.
Masking is BERT's (Devlin et al., 2019): 15% of the non-special caption tokens are selected; of
those 80% become [MASK], 10% a random (non-special) token, 10% stay; labels are −100 elsewhere.

Positions: text token t gets position t; patch j gets position max_seq_len − P + j, the tail of the
config's position table (learned, sinusoidal or RoPE). So patch positions never depend on the
caption's padded length, and config.max_seq_len must be ≥ T + P (an error says so otherwise).
Metrics: "loss" and "mmlm_acc", the accuracy of argmax over the vocabulary on the masked tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import StepBatches
from ..data.images import IMAGE_WORDS, ShapesDataset
from ..model.heads import MLMHead
from ..model.models import LlmkitModel
from ..model.transformer import ModelOutput, Transformer
from .clm import IGNORE_INDEX


class MultimodalEncoder(LlmkitModel):
    """[text ; image patches or features] through one bidirectional Transformer; MLM logits on text."""
    head_names, tied_head = ("mlm_head",), "mlm_head.decoder"

    def __init__(self, config, *, patch_size: int = 4, image_channels: int = 3, feature_dim: Optional[int] = None):
        super().__init__()
        if config.is_encoder_decoder:
            raise ValueError("MultimodalEncoder: ModelConfig.is_encoder_decoder=True; expected an encoder config "
                             "(e.g. preset bert-tiny)")
        self.config, self.patch_size, self.image_channels = config, patch_size, image_channels
        d = config.d_model
        self.transformer = Transformer(config, causal=False)
        self.patch_embed = nn.Linear(image_channels * patch_size * patch_size, d)   # E_patch
        self.feature_proj = nn.Linear(feature_dim, d) if feature_dim else None      # W_f
        self.modality_embed = nn.Embedding(2, d)                                    # m_txt = [0], m_img = [1]
        self.mlm_head = MLMHead(config)
        self.init_weights()

    def embed_image(self, images: Optional[torch.Tensor] = None,
                    features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Y: (B, C, H, W) images -> (B, P, d) patch embeddings, or (B, N, f) features -> (B, N, d)."""
        if (images is None) == (features is None):
            raise ValueError("MultimodalEncoder: pass exactly one of images= (B, C, H, W) or features= (B, N, f)")
        if features is not None:
            if self.feature_proj is None or features.dim() != 3 or features.shape[-1] != self.feature_proj.in_features:
                want = self.feature_proj.in_features if self.feature_proj is not None else "set feature_dim"
                raise ValueError(f"features shape {tuple(features.shape)}: expected (B, N, {want})")
            y = self.feature_proj(features)                                         # (B, N, d)
        else:
            p, C = self.patch_size, self.image_channels
            if images.dim() != 4 or images.shape[1] != C or images.shape[2] % p or images.shape[3] % p:
                raise ValueError(f"images shape {tuple(images.shape)}: expected (B, {C}, H, W) with H and W "
                                 f"multiples of patch_size={p}")
            B, _, H, W = images.shape
            patches = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
            y = self.patch_embed(patches.reshape(B, (H // p) * (W // p), C * p * p))  # (B, P, d)
        return y + self.modality_embed.weight[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                images: Optional[torch.Tensor] = None, features: Optional[torch.Tensor] = None,
                feature_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        """logits (B, T, V) for the text positions; last_hidden_state (B, T + P, d), text first."""
        B, T = input_ids.shape
        tr = self.transformer
        x = tr.embed_tokens(input_ids) * tr.embed_scale + self.modality_embed.weight[0]  # (B, T, d)
        y = self.embed_image(images, features)                                      # (B, P, d)
        P, L = y.shape[1], self.config.max_seq_len
        if T + P > L:
            raise ValueError(f"{T} text tokens + {P} image positions exceed ModelConfig.max_seq_len={L}; "
                             f"expected max_seq_len >= {T + P}")
        pos = torch.cat([torch.arange(T), torch.arange(L - P, L)]).to(input_ids.device).expand(B, T + P)
        text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        image_mask = feature_mask if feature_mask is not None else text_mask.new_ones(B, P)
        out = tr(attention_mask=torch.cat([text_mask, image_mask.to(text_mask.dtype)], 1),  # (B, T + P)
                 inputs_embeds=torch.cat([x, y.to(x.dtype)], 1), position_ids=pos)
        out.logits = self.mlm_head(out.last_hidden_state[:, :T])                    # (B, T, V)
        return out

    def save(self, directory) -> Path:
        """model.safetensors + mmlm_config.json (no Hugging Face layout exists for this model)."""
        from ..io.hf import expected_tensors
        from ..io.safetensors_files import atomic_write_text, write_tensors
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_tensors({k: v.detach().cpu().contiguous() for k, v in expected_tensors(self).items()}, directory, "2GB")
        feature_dim = self.feature_proj.in_features if self.feature_proj is not None else None
        meta = {"format": "llmkit-mmlm", "patch_size": self.patch_size, "image_channels": self.image_channels,
                "feature_dim": feature_dim, "config": self.config.to_dict()}
        atomic_write_text(directory / "mmlm_config.json", json.dumps(meta, indent=2))
        return directory


def bert_mask(input_ids: torch.Tensor, maskable: torch.Tensor, *, mask_id: int, random_ids: torch.Tensor,
              generator: Optional[torch.Generator] = None, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of the `maskable` (B, T) positions -> (masked ids, labels = original id or −100)."""
    selected = (torch.rand(input_ids.shape, generator=generator) < prob) & maskable      # (B, T)
    roll = torch.rand(input_ids.shape, generator=generator)                              # 80 / 10 / 10
    random_tokens = random_ids[torch.randint(len(random_ids), input_ids.shape, generator=generator)]
    masked = torch.where(selected & (roll < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(selected & (roll >= 0.8) & (roll < 0.9), random_tokens, masked)
    return masked, torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


class MMLMCollator:
    """[(image, caption, ...)] -> {"input_ids", "attention_mask", "labels" (B, T), "images" (B, C, H, W)}.

    Captions become [CLS] caption [SEP] (truncated to max_length), right-padded; an item whose first
    element is 2-D (N, f) gives "features" (B, N, f) instead of "images"."""

    def __init__(self, tokenizer, *, mask_prob: float = 0.15, max_length: int = 64):
        missing = [f"{r}_token" for r in ("mask", "cls", "sep") if getattr(tokenizer, f"{r}_token_id", None) is None]
        if missing:
            raise ValueError(f"tokenizer has no {', '.join(missing)}: the mmlm objective expected a vocabulary with "
                             "[MASK], [CLS] and [SEP] (special_tokens mask/cls/sep)")
        if not 0 < mask_prob < 1 or max_length < 3:
            raise ValueError(f"mask_prob={mask_prob!r}, max_length={max_length!r}: expected 0 < mask_prob < 1, "
                             "max_length >= 3")
        self.tokenizer, self.mask_prob, self.max_length = tokenizer, mask_prob, max_length
        self.pad_id = tokenizer.pad_id
        self.special_ids = torch.tensor(sorted(tokenizer.special_ids))
        self.random_ids = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in tokenizer.special_ids])

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, T) with T the longest [CLS] caption [SEP]."""
        tok = self.tokenizer
        rows = [[tok.cls_token_id] + ids[: self.max_length - 2] + [tok.sep_token_id]
                for ids in tok.encode_batch(list(captions), add_special_tokens=False)]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)], attention_mask[i, :len(r)] = torch.tensor(r), 1
        return input_ids, attention_mask

    def __call__(self, examples: Sequence, generator: Optional[torch.Generator] = None) -> dict:
        input_ids, attention_mask = self.encode([e[1] for e in examples])
        maskable = (attention_mask == 1) & ~torch.isin(input_ids, self.special_ids)   # never specials / pad
        masked, labels = bert_mask(input_ids, maskable, mask_id=self.tokenizer.mask_token_id,
                                   random_ids=self.random_ids, generator=generator, prob=self.mask_prob)
        y = torch.stack([torch.as_tensor(e[0], dtype=torch.float32) for e in examples])
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels,
                ("features" if y.dim() == 3 else "images"): y}


def mmlm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """L = mean over labelled text positions of −log softmax(logits)[label]; + "mmlm_acc"."""
    extra = {k: batch[k] for k in ("images", "features", "feature_mask") if batch.get(k) is not None}
    logits = model(batch["input_ids"], batch.get("attention_mask"), **extra).logits.float()  # (B, T, V)
    labels = batch["labels"]                                                                 # (B, T)
    scored = labels != IGNORE_INDEX
    if not scored.any():  # nothing masked in this batch: a zero loss that keeps the graph
        return logits.sum() * 0.0, {"loss": 0.0, "mmlm_acc": float("nan")}
    loss = F.cross_entropy(logits[scored], labels[scored])
    acc = (logits[scored].argmax(-1) == labels[scored]).float().mean()
    return loss, {"loss": loss.item(), "mmlm_acc": acc.item()}


def mask_words(batch: dict, tokenizer, words: Sequence[str] = IMAGE_WORDS) -> dict:
    """A copy of an (unmasked) batch where exactly the tokens of `words` (colour and shape words by
    default) are [MASK] and labelled, all else −100: the "MMLM uses the image" probe. Each word must
    be one token after a space (a BPE vocabulary trained on the captions; not a char vocabulary)."""
    ids = {}
    for word in words:
        enc = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"word {word!r} is {len(enc)} tokens: expected one token per word (train a BPE "
                             "tokenizer on the captions)")
        ids[word] = enc[0]
    input_ids = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])  # unmask
    target = torch.isin(input_ids, torch.tensor(list(ids.values())))
    return {**batch, "input_ids": input_ids.masked_fill(target, tokenizer.mask_token_id),
            "labels": input_ids.masked_fill(~target, IGNORE_INDEX)}


class ShapesMMLMBatches(StepBatches):
    """Endless batches over a ShapesDataset: step s draws `batch_size` example indices and the masks
    from generators seeded by (seed, s), so a batch is a pure function of the step and the state is
    {"step": s}. Rank r keeps rows r::world_size of the global batch (padded globally)."""
    _config_keys = ("seed", "batch_size")

    def __init__(self, dataset: ShapesDataset, collator: MMLMCollator, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: expected the global "
                             "batch_size divisible by world_size and 0 <= rank < world_size")
        self.dataset, self.collator, self.batch_size, self.seed = dataset, collator, batch_size, int(seed)
        self.rank, self.world_size, self.step = rank, world_size, 0

    def batch_at(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        index = rng.integers(0, len(self.dataset), self.batch_size)
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        batch = self.collator([self.dataset[int(i)] for i in index], generator)
        return {k: v[self.rank::self.world_size] for k, v in batch.items()}


class MaskedMultimodalObjective:
    """MMLM over synthetic shapes (`data.source: shapes`): the objective builds its own model.

    Defaults: 24 × 24 images with 8 × 8 patches, one patch per cell of the generator's 3 × 3 grid
    (P = 9). With 16 × 16 images and 4 × 4 patches an object straddles four patches, and a CPU-minute
    of training learns the colour words but leaves the shape words near chance."""

    name = "mmlm"
    task = "mmlm"
    tasks = ("mmlm",)
    special_tokens = {"mask": "[MASK]", "cls": "[CLS]", "sep": "[SEP]"}

    def __init__(self, *, image_size: int = 24, patch_size: int = 8, max_objects: int = 2,
                 mask_prob: float = 0.15):
        self.image_size, self.patch_size = image_size, patch_size
        self.max_objects, self.mask_prob = max_objects, mask_prob

    def build_model(self, config) -> MultimodalEncoder:
        if config.causal:
            raise ValueError("objective mmlm needs a bidirectional encoder but ModelConfig.causal=True; expected "
                             "causal: false (e.g. preset bert-tiny)")
        return MultimodalEncoder(config, patch_size=self.patch_size)

    def make_data(self, source, tokenizer, data, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  eval_batches: int = 20):
        from .base import ObjectiveData
        if source != "shapes":
            raise ValueError(f"objective mmlm: data.source={source!r}; expected 'shapes' (the synthetic "
                             "image-caption generator, llmkit.data.images)")
        collator = MMLMCollator(tokenizer, mask_prob=self.mask_prob, max_length=data.block_size)
        n, options = data.synthetic_examples, dict(size=self.image_size, max_objects=self.max_objects)
        train = ShapesMMLMBatches(ShapesDataset(n, data.seed, **options), collator, data.batch_size, seed=seed,
                                  rank=rank, world_size=world_size)
        val_set = ShapesDataset(max(1, eval_batches) * data.batch_size, data.seed, start=n, **options)
        val = ShapesMMLMBatches(val_set, collator, data.batch_size, seed=12345, rank=rank, world_size=world_size)
        return ObjectiveData(train, lambda: (val.batch_at(i) for i in range(eval_batches)))

    def loss(self, model, batch):
        return mmlm_loss(model, batch)
