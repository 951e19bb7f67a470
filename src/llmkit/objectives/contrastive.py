"""Contrastive sentence-embedding pretraining: triplet margin loss and in-batch InfoNCE.

Embeddings z = normalize(pool(h)) with h = model(...).last_hidden_state (B, T, d), pool the masked
mean or the first ([CLS]) token (`llmkit.model.heads.pool`), L2 normalisation optional; a model
that returns `.embeddings` (ProjectionModel) is used as is.

Triplet margin loss (Weinberger & Saul, 2009, "Distance Metric Learning for Large Margin Nearest
Neighbor Classification"; Schroff et al., 2015, "FaceNet"), over B triplets (anchor, positive,
negative):

    L = (1/B) Σ_i max(0, d(a_i, p_i) − d(a_i, n_i) + α)       (reduction="mean"; "sum" drops 1/B)

d Euclidean ‖a − p‖₂ or cosine 1 − cos(a, p). The issue writes Σ; the default is the mean, so the
loss scale does not depend on the batch size and gradient accumulation of means stays exact.

In-batch InfoNCE (van den Oord et al., 2018, "Representation Learning with Contrastive Predictive
Coding"; SimCLR, Chen et al., 2020; SimCSE, Gao et al., 2021), over B pairs (z_i, z_i⁺), with the
other rows' positives as negatives:

    L = −(1/B) Σ_i log exp(s(z_i, z_i⁺)/τ) / [Σ_j exp(s(z_i, z_j⁺)/τ) + Σ_j exp(s(z_i, z_j⁻)/τ)]

s = cosine similarity, τ the temperature; the z_j⁻ term only with hard negatives (supervised
SimCSE). Unsupervised SimCSE: the same sentence encoded twice in train mode, so dropout (> 0 in the
model config) makes the two views. Under torchrun the candidates z_j⁺ (and z_j⁻) of every rank are
gathered (differentiably), so N ranks optimise the single-process loss of the global batch.

Evaluation: recall@1 (is each anchor's own positive its nearest, by cosine, among all positives?)
and kNN accuracy (a query takes the majority label of its k nearest reference embeddings).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..model.heads import pool
from ..model.modes import evaluating
from .contrastive_data import (ContrastiveBatches, ContrastiveExamples, encode_truncated, pad_views, pairable,
                               perturbed_pairs, read_examples, split_examples)

LOSSES, DISTANCES, POOLINGS = ("infonce", "triplet"), ("euclidean", "cosine"), ("mean", "cls")


# ---- losses ------------------------------------------------------------------------------------
def pair_distance(x: torch.Tensor, y: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """(B, d), (B, d) -> (B,): ‖x − y‖₂ or 1 − cos(x, y)."""
    if distance == "euclidean":
        return (x - y).pow(2).sum(-1).clamp_min(1e-12).sqrt()                        # (B,)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=1e-8)                     # (B,)
    raise ValueError(f"distance={distance!r}: expected one of {list(DISTANCES)}")


def triplet_margin_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *,
                        margin: float = 0.5, distance: str = "euclidean", reduction: str = "mean") -> torch.Tensor:
    """max(0, d(a, p) − d(a, n) + margin), averaged (or summed) over the B triplets (B, d) each."""
    losses = (pair_distance(anchor, positive, distance) - pair_distance(anchor, negative, distance)
              + margin).clamp_min(0.0)                                                # (B,)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")


def similarity_logits(z: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, d), (M, d) -> (B, M) cosine similarities / τ."""
    return F.normalize(z, dim=-1) @ F.normalize(candidates, dim=-1).T / temperature  # (B, M)


def info_nce_loss(z: torch.Tensor, positives: torch.Tensor, *, temperature: float = 0.05,
                  negatives: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-batch InfoNCE: row i of z (B, d) must pick positives[targets[i]] (default i) among all
    positives (M, d) and the optional hard negatives (M', d)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a positive float")
    candidates = positives if negatives is None else torch.cat([positives, negatives])  # (M + M', d)
    logits = similarity_logits(z.float(), candidates.float(), temperature)          # (B, M + M')
    if targets is None:
        targets = torch.arange(z.shape[0], device=z.device)                         # (B,)
    return F.cross_entropy(logits, targets)


# ---- embeddings and metrics --------------------------------------------------------------------
def embed_output(out: Any, attention_mask: Optional[torch.Tensor] = None, *, pooling: str = "mean",
                 normalize: bool = True) -> torch.Tensor:
    """A model output -> (B, d): its .embeddings, else pool(.last_hidden_state (B, T, d))."""
    z = getattr(out, "embeddings", None)
    if z is None:
        hidden = out if isinstance(out, torch.Tensor) else (
            out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])  # (B, T, d)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: expected one of {list(POOLINGS)}")
        z = pool(hidden, attention_mask, pooling)                                     # (B, d)
    z = z.float()
    return F.normalize(z, dim=-1) if normalize else z


def embed(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
          pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """(B, T) -> (B, d) sentence embeddings of any model returning .embeddings or .last_hidden_state."""
    return embed_output(model(input_ids, attention_mask=attention_mask), attention_mask, pooling=pooling,
                        normalize=normalize)


def recall_at_1(anchors: torch.Tensor, positives: torch.Tensor) -> float:
    """Fraction of i whose nearest positive (cosine, (N, d) each) is positives[i]."""
    sims = F.normalize(anchors.float(), dim=-1) @ F.normalize(positives.float(), dim=-1).T  # (N, N)
    return (sims.argmax(-1) == torch.arange(len(anchors), device=sims.device)).float().mean().item()


def knn_predict(queries: torch.Tensor, keys: torch.Tensor, key_labels: Sequence, k: int = 10) -> list:
    """The majority label among each query's k nearest keys by cosine; a tie goes to the tied label
    whose member ranks nearest."""
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # (Q, N)
    top = sims.topk(min(k, keys.shape[0]), dim=-1).indices.tolist()                  # nearest first
    # most_common sorts stably, so among tied counts the label seen first (nearest) wins
    return [Counter(key_labels[j] for j in row).most_common(1)[0][0] for row in top]


def knn_accuracy(queries: torch.Tensor, query_labels: Sequence, keys: torch.Tensor, key_labels: Sequence,
                 k: int = 10) -> float:
    predictions = knn_predict(queries, keys, key_labels, k)
    return sum(p == y for p, y in zip(predictions, query_labels)) / len(predictions)


def encode_texts(model, tokenizer, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True,
                 block_size: int = 128, batch_size: int = 64) -> torch.Tensor:
    """(N, d) embeddings in eval mode, batched by length (less padding), in the order of `texts`."""
    ids = encode_truncated(tokenizer, list(texts), block_size)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [None] * len(ids)
    with evaluating(model) as device:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            input_ids, mask = pad_views([[ids[i]] for i in chunk], tokenizer.pad_id)    # (b, 1, T)
            z = embed(model, input_ids[:, 0].to(device), mask[:, 0].to(device), pooling=pooling,
                      normalize=normalize)                                              # (b, d)
            for i, row in zip(chunk, z.cpu()):
                out[i] = row
    return torch.stack(out)                                                           # (N, d)


class _GatherRows(torch.autograd.Function):
    """all_gather of (b, d) rows from every rank -> (W·b, d); backward sums the gradients of all
    ranks' losses and returns this rank's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)                                                       # (W·b, d)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                                                         # Σ_r ∂L_r/∂rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]                    # (b, d)


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows (differentiable) and this rank's offset among them; (x, 0) when single."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherRows.apply(x), dist.get_rank() * x.shape[0]


# ---- the objective -----------------------------------------------------------------------------
class ContrastiveObjective:
    """Sentence-embedding pretraining on pairs, labelled sentences or plain texts (SimCSE).

    loss "infonce" (temperature τ; `hard_negatives` adds a negative per row to the candidates) or
    "triplet" (margin α, distance "euclidean" | "cosine", reduction "mean" | "sum"); pooling "mean" |
    "cls"; mode "auto" | "pairs" | "labels" | "texts" (see contrastive_data.py). Batches hold
    input_ids / attention_mask (B, k, T); all views go through the model in one (B·k, T) forward.
    Metrics: loss, in-batch recall@1 and, with labels, knn1_acc (the nearest candidate has the
    anchor's label). Validation holds out `data.val_fraction` of the rows; plain texts are held out
    as (text, perturbed copy) pairs, so recall@1 is a real retrieval test there too.
    """

    name = "contrastive"
    task = "encoder"
    tasks = ("encoder",)

    def __init__(self, loss: str = "infonce", *, pooling: str = "mean", normalize: bool = True,
                 temperature: float = 0.05, margin: float = 0.5, distance: str = "cosine",
                 reduction: str = "mean", hard_negatives: bool = False, mode: str = "auto",
                 label_field: str = "label", anchor_field: str = "anchor", positive_field: str = "positive",
                 negative_field: str = "negative"):
        for name, value, allowed in (("loss", loss, LOSSES), ("pooling", pooling, POOLINGS),
                                     ("distance", distance, DISTANCES), ("reduction", reduction, ("mean", "sum"))):
            if value not in allowed:
                raise ValueError(f"contrastive {name}={value!r}: expected one of {list(allowed)}")
        if not temperature > 0:
            raise ValueError(f"contrastive temperature={temperature!r}: expected a positive float")
        if not margin >= 0:
            raise ValueError(f"contrastive margin={margin!r}: expected a non-negative float")
        self.loss_name, self.pooling, self.normalize = loss, pooling, normalize
        self.temperature, self.margin, self.distance, self.reduction = temperature, margin, distance, reduction
        self.hard_negatives, self.mode = hard_negatives, mode
        self.fields = dict(label_field=label_field, anchor_field=anchor_field, positive_field=positive_field,
                           negative_field=negative_field)

    @property
    def needs_negatives(self) -> bool:
        return self.loss_name == "triplet" or self.hard_negatives

    def build_model(self, config):
        if config.causal or config.is_encoder_decoder:
            raise ValueError(f"objective 'contrastive' trains a bidirectional encoder (task 'encoder'), but the "
                             f"model config (family {config.family!r}) has causal={config.causal}, "
                             f"is_encoder_decoder={config.is_encoder_decoder}: expected an encoder such as "
                             "preset bert-tiny (or model.causal: false)")
        from ..model import EncoderModel
        return EncoderModel(config)

    # -- data -----------------------------------------------------------------------------------
    def read(self, source: Any, text_field: str = "text", split_lines: Any = True) -> ContrastiveExamples:
        return read_examples(source, mode=self.mode, text_field=text_field, split_lines=split_lines, **self.fields)

    def make_data(self, source, tokenizer, data, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  eval_batches: int = 20):
        from .base import ObjectiveData
        examples = self.read(source, data.text_field, data.split_lines or True)
        train, val = split_examples(examples, data.val_fraction, data.seed)
        val = pairable(val) if val is not None else None
        if rank == 0:
            print(f"data: {len(train):,} train / {len(val) if val else 0:,} val {examples.mode} rows")
        loader = ContrastiveBatches(train, tokenizer, data.batch_size, data.block_size, seed=seed, rank=rank,
                                    world_size=world_size, negatives=self.needs_negatives)
        if val is None:
            return ObjectiveData(loader)
        if val.mode == "texts":
            val = perturbed_pairs(val, data.seed)
        size = min(data.batch_size, len(val) // world_size * world_size)
        if size < 2:
            return ObjectiveData(loader)
        held = ContrastiveBatches(val, tokenizer, size, data.block_size, seed=12345, rank=rank,
                                  world_size=world_size, negatives=self.needs_negatives)
        return ObjectiveData(loader, lambda: (held.batch_at(i) for i in range(eval_batches)))

    # -- loss -----------------------------------------------------------------------------------
    def embed(self, model, input_ids, attention_mask=None) -> torch.Tensor:
        return embed(model, input_ids, attention_mask, pooling=self.pooling, normalize=self.normalize)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = batch["input_ids"], batch.get("attention_mask")                  # (B, k, T)
        if ids.dim() != 3:
            raise ValueError(f"contrastive batch input_ids: expected (B, views, T), got shape {tuple(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids)
        if ids.shape[1] == 1:                                                        # SimCSE: two dropout views
            self._check_dropout(model)
            ids, mask = ids.expand(-1, 2, -1), mask.expand(-1, 2, -1)                # (B, 2, T)
        B, k, T = ids.shape
        out = model(ids.reshape(B * k, T), attention_mask=mask.reshape(B * k, T))
        z = embed_output(out, mask.reshape(B * k, T), pooling=self.pooling,
                         normalize=self.normalize).view(B, k, -1)  # (B, k, d)
        anchors, positives = z[:, 0], z[:, 1]                                        # (B, d) each
        negatives = z[:, 2] if k > 2 else None
        if self.needs_negatives and negatives is None:
            raise ValueError(f"contrastive loss={self.loss_name!r}"
                             f"{' with hard_negatives' if self.hard_negatives else ''} needs a negative per row "
                             f"(batches of 3 views), got {k} view(s)")
        all_pos, offset = _gather(positives)                                         # (M, d)
        targets = torch.arange(B, device=z.device) + offset                          # (B,)
        if self.loss_name == "triplet":
            loss = triplet_margin_loss(anchors, positives, negatives, margin=self.margin, distance=self.distance,
                                       reduction=self.reduction)
        else:
            all_neg = _gather(negatives)[0] if self.hard_negatives else None
            loss = info_nce_loss(anchors, all_pos, temperature=self.temperature, negatives=all_neg, targets=targets)
        pooled = getattr(out, "pooler_output", None)
        if isinstance(pooled, torch.Tensor) and pooled.requires_grad:
            loss = loss + 0.0 * pooled.sum()      # BERT's pooler is unused: DDP must still see it used
        with torch.no_grad():
            sims = F.normalize(anchors, dim=-1) @ F.normalize(all_pos, dim=-1).T       # (B, M)
            nearest = sims.argmax(-1)                                                  # (B,)
            metrics = {"loss": float(loss.detach()), "recall@1": (nearest == targets).float().mean().item(),
                       "pos_sim": sims.gather(1, targets[:, None]).mean().item()}
            if batch.get("labels") is not None:
                all_labels = _gather(batch["labels"].to(z.device))[0]                  # (M,)
                metrics["knn1_acc"] = (all_labels[nearest] == batch["labels"].to(z.device)).float().mean().item()
        return loss, metrics

    @staticmethod
    def _check_dropout(model) -> None:
        config = getattr(getattr(model, "module", model), "config", None)
        if model.training and config is not None and not (getattr(config, "dropout", 0) > 0
                                                            or getattr(config, "attn_dropout", 0) > 0):
            raise ValueError("contrastive SimCSE (one view per row) needs dropout to make two views, but the model "
                             "config has dropout=0 and attn_dropout=0: expected model.dropout > 0 (SimCSE uses "
                             "0.1), or supply positive pairs")

    def evaluate(self, model, batches) -> dict[str, float]:
        """Mean in-batch recall@1 (and knn1_acc with labels) over `batches`, in eval mode."""
        sums, n = {}, 0
        with evaluating(model):
            for batch in batches:
                _, metrics = self.loss(model, batch)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                n += 1
        return {key: value / max(n, 1) for key, value in sums.items()}

