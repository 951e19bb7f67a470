"""Causal language modelling: predict every token from the tokens before it.

For a sequence x_1 … x_T the loss is the mean negative log-likelihood of the next token,

    L = −(1 / N) Σ_t log P(x_{t+1} | x_≤t),   P(· | x_≤t) = softmax(W_lm h_t)

over the N positions whose target is not ignored (Radford et al., 2018, "Improving Language
Understanding by Generative Pre-Training"; 2019, "Language Models are Unsupervised Multitask
Learners"). Perplexity is exp(L).

Batches: "input_ids" (B, T) and the targets in one of three forms, -100 = ignored:
- "targets" (B, T): already shifted, targets[t] is the token after input_ids[t] (nanoGPT style;
  what `llmkit.data` loaders yield): every position is scored;
- "labels" (B, T): aligned with input_ids as in Hugging Face, labels[t] = x_t: shifted here;
- neither: labels = input_ids, where "attention_mask" (B, T) zeros become ignored targets.
Optional "attention_mask" and "position_ids" (B, T) are passed to the model.
The cross-entropy is computed in fp32 even under bf16/fp16 autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def clm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, {"loss": float, "ppl": float}) for a causal LM called as model(input_ids, attention_mask)."""
    input_ids = batch["input_ids"]                                                 # (B, T)
    attention_mask = batch.get("attention_mask")                                   # (B, T) or None
    # Packed documents: positions restart and attention stays inside each document when the batch
    # carries them (llmkit.data loaders with reset_positions_at_eos=True).
    extra = {k: batch[k] for k in ("position_ids", "doc_ids") if batch.get(k) is not None}
    logits = model(input_ids, attention_mask=attention_mask, **extra).logits      # (B, T, V)
    if batch.get("targets") is not None:
        scored, targets = logits, batch["targets"]                                 # (B, T, V), (B, T)
    else:
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        scored, targets = logits[:, :-1, :], labels[:, 1:]                         # position t predicts t+1
    loss = F.cross_entropy(scored.float().reshape(-1, scored.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    value = loss.item()
    return loss, {"loss": value, "ppl": math.exp(min(value, 80.0)) if math.isfinite(value) else float("nan")}


class CausalLMObjective:
    """CLM over a token stream: the corpus is tokenized once into memmap shards (EOS after each
    document, `data.val_fraction` held out), then read as random windows (nanoGPT) or packed
    epochs. Validation reads the same fixed windows each time, so val curves compare across steps."""

    name = "clm"
    task = "causal_lm"

    def make_data(self, source, tokenizer, data, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  eval_batches: int = 20):
        from ..data import PackedBatches, RandomWindowBatches
        from .base import ObjectiveData, token_shards

        train_tokens, val_tokens = token_shards(source, tokenizer, data, rank)
        loader = RandomWindowBatches if data.sampling == "random" else PackedBatches
        # separate_documents: each window's documents get their own positions and attention blocks.
        packing = dict(reset_positions_at_eos=True, eos_token_id=tokenizer.eos_token_id) \
            if getattr(data, "separate_documents", False) else {}
        train = loader(train_tokens, data.batch_size, data.block_size, seed=seed, rank=rank,
                       world_size=world_size, **packing)
        val_windows = RandomWindowBatches(val_tokens, data.batch_size, data.block_size, seed=12345,
                                          rank=rank, world_size=world_size, **packing)
        return ObjectiveData(train, lambda: (val_windows.batch_at(i) for i in range(eval_batches)))

    def loss(self, model, batch):
        return clm_loss(model, batch)
