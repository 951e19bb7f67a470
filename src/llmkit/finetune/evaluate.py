"""Evaluation: a model plus data -> metrics, during training (dev), after it (test), and as
`llmkit eval checkpoint data`.

    classification  loss, accuracy, precision / recall / F1 (macro and micro), confusion matrix
    causal LM       loss and perplexity over response tokens; with generate: exact match of the
                    greedy answer to the reference response
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..generation import generate
from ..objectives.clm import IGNORE_INDEX
from ..recipes import RecipeError
from ..tokenizer import Tokenizer, load_tokenizer
from .metrics import classification_metrics, exact_match, format_metrics, perplexity
from .sft import prompt_ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_classification(model, batches, label_names: Sequence[str]) -> dict:
    """Mean loss (example- or token-weighted) and classification_metrics over every batch."""
    was_training, device = model.training, _device(model)
    model.eval()
    preds, refs, loss_sum = [], [], 0.0
    try:
        for batch in batches:
            batch = _to(batch, device)
            extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits.float()
            labels = batch["labels"]                                               # (B,) or (B, T)
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum").item()
            keep = labels != IGNORE_INDEX
            preds += logits.argmax(-1)[keep].cpu().tolist()
            refs += labels[keep].cpu().tolist()
    finally:
        model.train(was_training)
    metrics = {"loss": loss_sum / max(len(refs), 1)}
    metrics.update(classification_metrics(preds, refs, len(label_names), label_names))
    return metrics


@torch.no_grad()
def evaluate_lm(model, batches) -> dict:
    """Token-weighted loss and perplexity over the scored (non -100) targets of every batch."""
    was_training, device = model.training, _device(model)
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for batch in batches:
            batch = _to(batch, device)
            extra = {k: batch[k] for k in ("attention_mask", "position_ids", "doc_ids") if k in batch}
            logits = model(batch["input_ids"], **extra).logits.float()            # (B, T, V)
            targets = batch["targets"]                                             # (B, T)
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return perplexity(nll, tokens)


@torch.no_grad()
def generate_answers(model, tokenizer: Tokenizer, conversations: Sequence[list], template: Optional[str] = None,
                     max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy answers to the last assistant turn of each conversation (left-padded batches); each
    answer stops at EOS or at any special token (a template's end-of-turn marker)."""
    was_training, device = model.training, _device(model)
    model.eval()
    stops = sorted(tokenizer.special_ids - {tokenizer.pad_token_id} if tokenizer.pad_token_id is not None
                   else tokenizer.special_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    answers = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [prompt_ids(tokenizer, c, template) for c in conversations[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)           # (B, T) left-padded
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for b, p in enumerate(prompts):
                ids[b, width - len(p):] = torch.tensor(p)
                mask[b, width - len(p):] = 1
            out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                           stop_token_ids=stops)
            for row in out[:, width:].cpu().tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                answers.append(tokenizer.decode(row[:cut]))
    finally:
        model.train(was_training)
    return answers


def evaluate_generation(model, tokenizer: Tokenizer, conversations: Sequence[list], template: Optional[str] = None,
                        max_new_tokens: int = 32) -> dict:
    answers = generate_answers(model, tokenizer, conversations, template, max_new_tokens)
    references = [c[max(i for i, m in enumerate(c) if m["role"] == "assistant")]["content"] for c in conversations]
    return {"exact_match": exact_match(answers, references), "generated": len(answers)}


# ---- `llmkit eval` -------------------------------------------------------------------------------
@dataclass
class EvalRecipe:
    model: str = ""                      # a folder written by `llmkit finetune` (or any HF / llmkit checkpoint)
    data: Any = None                     # a path, rows or {hf: ...}, as in a finetune recipe
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    rows: Optional[int] = None           # a seeded random subset of the rows
    seed: int = 0
    max_len: int = 128
    batch_size: int = 32
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    generate: bool = True                # causal LM: greedy answers scored by exact match
    max_new_tokens: int = 32
    out: Optional[str] = None            # also write the metrics here (.json)


def run_eval(job: EvalRecipe) -> dict:
    """Metrics of a checkpoint on a data set; prints a markdown table and returns the dict."""
    from .data import LabelVocab, load_rows
    from .models import load_finetuned
    from .runner import make_eval_batches
    if not job.model or job.data is None:
        raise RecipeError(f"eval: model={job.model!r} data={job.data!r}: expected a checkpoint folder and a data source")
    model, meta = load_finetuned(job.model)
    tokenizer = load_tokenizer(job.model)
    task = meta["task"]
    if task not in ("causal_lm", "sequence_classification", "token_classification"):
        raise RecipeError(f"eval: {job.model!r} holds a {task}: expected a causal LM or a classifier")
    rows, shape = load_rows(job.data, "eval", job.format, task, job.columns, job.rows, job.seed)
    vocab = LabelVocab(meta["labels"], origin="the checkpoint's labels") if "labels" in meta else None
    batches, conversations = make_eval_batches(rows, shape, task, tokenizer, vocab, split="eval", max_len=job.max_len,
                                               batch_size=job.batch_size, template=job.chat_template,
                                               system_prompt=job.system_prompt)
    if task == "causal_lm":
        metrics = evaluate_lm(model, batches)
        if job.generate:
            metrics.update(evaluate_generation(model, tokenizer, conversations, job.chat_template, job.max_new_tokens))
    else:
        metrics = evaluate_classification(model, batches, vocab.names)
    print(format_metrics(metrics, title=f"{job.model} on {len(rows)} rows"))
    if job.out:
        Path(job.out).parent.mkdir(parents=True, exist_ok=True)
        Path(job.out).write_text(json.dumps(metrics, indent=2))
    return metrics
