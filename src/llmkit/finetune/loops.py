"""The metric loops: a model plus batches -> metrics, used by every Task's evaluate and by the
forgetting report. Each runs under no_grad in eval mode and puts the model back in its mode.

    heldout_perplexity     token-weighted NLL, L = Σ_b n_b L_b / Σ_b n_b (n_b scored targets of
                           batch b, L_b its mean loss), ppl = exp(L)
    evaluate_classification  loss, accuracy, precision / recall / F1 (macro, micro), confusion matrix
    evaluate_generation    greedy answers to the last assistant turn, exact match to the reference
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..generation import generate
from ..model.modes import evaluating
from ..objectives.clm import IGNORE_INDEX, clm_loss
from ..tokenizer import Tokenizer
from ..train.distributed import move_to
from .metrics import classification_metrics, exact_match
from .sft import prompt_ids


def scored_tokens(batch: dict) -> int:
    """How many targets `clm_loss` scores in this batch (its three conventions, -100 ignored)."""
    if batch.get("targets") is not None:
        return int((batch["targets"] != IGNORE_INDEX).sum())
    labels = batch.get("labels")
    if labels is not None:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    mask = batch.get("attention_mask")
    labels = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def heldout_perplexity(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None,
                       loss_fn: Optional[Callable] = None) -> dict:
    """{"loss", "ppl", "tokens"} over up to `max_batches` batches (None: all), with loss_fn
    (clm_loss by default) as each batch's mean loss."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r}: expected an int >= 1 (or None for every batch)")
    loss_fn = loss_fn or clm_loss
    total, tokens, count = 0.0, 0, 0
    with evaluating(model) as device:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            batch = move_to(batch, device)
            n = scored_tokens(batch)
            if n:
                loss, _ = loss_fn(model, batch)
                total += float(loss) * n       # the batch's mean back to its sum
                tokens += n
            count += 1
    if tokens == 0:
        raise ValueError(f"heldout_perplexity: {count} batches held no scored target (all -100 or none "
                         "given); expected batches with input_ids and targets")
    loss = total / tokens
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def evaluate_classification(model: nn.Module, batches: Iterable, label_names: Sequence[str]) -> dict:
    """Mean loss (example- or token-weighted) and classification_metrics over every batch."""
    preds, refs, loss_sum = [], [], 0.0
    with evaluating(model) as device:
        for batch in batches:
            batch = move_to(batch, device)
            extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits.float()
            labels = batch["labels"]                                               # (B,) or (B, T)
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum").item()
            keep = labels != IGNORE_INDEX
            preds += logits.argmax(-1)[keep].cpu().tolist()
            refs += labels[keep].cpu().tolist()
    metrics = {"loss": loss_sum / max(len(refs), 1)}
    metrics.update(classification_metrics(preds, refs, len(label_names), label_names))
    return metrics


def generate_answers(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[list],
                     template: Optional[str] = None, max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy answers to the last assistant turn of each conversation (left-padded batches); each
    answer stops at EOS or at any special token (a template's end-of-turn marker)."""
    stops = sorted(tokenizer.special_ids - {tokenizer.pad_token_id})
    answers = []
    with evaluating(model) as device:
        for start in range(0, len(conversations), batch_size):
            prompts = [prompt_ids(tokenizer, c, template) for c in conversations[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)   # (B, T) left-padded
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for b, p in enumerate(prompts):
                ids[b, width - len(p):] = torch.tensor(p)
                mask[b, width - len(p):] = 1
            out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                           stop_token_ids=stops)
            for row in out[:, width:].cpu().tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                answers.append(tokenizer.decode(row[:cut]))
    return answers


def evaluate_generation(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[list],
                        template: Optional[str] = None, max_new_tokens: int = 32) -> dict:
    answers = generate_answers(model, tokenizer, conversations, template, max_new_tokens)
    references = [c[max(i for i, m in enumerate(c) if m["role"] == "assistant")]["content"] for c in conversations]
    return {"exact_match": exact_match(answers, references), "generated": len(answers)}
