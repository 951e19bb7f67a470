"""`llmkit finetune recipe.yaml`: full fine-tuning (every parameter) on the Trainer.

    rows (train / dev / test) -> tokenizer -> examples -> batches
    model from a checkpoint or a preset, with the task head (+ llmkit.peft when `peft:` is given)
    loss: SFT (response tokens) | sequence / token classification
          (+ a pretraining mix, + an L2 pull to the initial weights: llmkit.finetune.forgetting)
    Trainer: optimizer adam | adamw | sgd from `train:`; every eval.eval_every steps the dev set
          is scored, the best weights (by eval.metric) are kept, early stopping after eval.patience
    end: the best weights are restored, scored on dev and test, and saved with the tokenizer

The run folder (train.out_dir) gets model/ (the kept model + tokenizer), summary.json,
metrics.md, eval.jsonl (every dev evaluation), recipe.yaml, and the Trainer's metrics.jsonl,
TensorBoard events, loss.png and checkpoints/.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data import RandomWindowBatches, iter_texts
from ..objectives.clm import clm_loss
from ..recipes import RecipeError, to_yaml
from ..tokenizer import Tokenizer, load_tokenizer, train_char
from ..train import Trainer
from .classification import (ClassificationBatches, encode_sequence_rows, encode_token_rows,
                             sequence_classification_loss, token_classification_loss)
from .data import LabelVocab, Row, load_rows, split_off
from .evaluate import evaluate_classification, evaluate_generation, evaluate_lm
from .metrics import format_metrics
from .models import build_finetune_model, save_finetuned
from .recipe import FinetuneRecipe
from .sft import SFTBatches, encode_sft_rows, load_template, row_messages, sft_loss


# ---- data ------------------------------------------------------------------------------------
def make_tokenizer(recipe: FinetuneRecipe, rows: list[Row], shape: str, template: Optional[str]) -> Tokenizer:
    name = recipe.model.tokenizer or recipe.model.checkpoint
    if name is None:
        raise RecipeError("model.tokenizer: a preset needs a tokenizer: a folder / tokenizer.json, or `char` "
                          "to train a character tokenizer on the training rows")
    if name != "char":
        return load_tokenizer(name)
    if shape in ("prompt_response", "messages"):
        probe = Tokenizer(train_char(texts=["x"]).backend, {"eos": "<|endoftext|>"})
        texts = [probe.apply_chat_template(row_messages(r, shape, recipe.data.system_prompt), chat_template=template)
                 for r in rows]
    elif shape == "text_label":
        texts = [r.values["text"] + (r.values.get("text_pair") or "") for r in rows]
    else:
        texts = [" ".join(r.values["tokens"]) for r in rows]
    return train_char(texts=texts, special_tokens=("<pad>", "<|endoftext|>", "<unk>"), pad_token="<pad>")


def _pad_id(tokenizer: Tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return token_id
    return 0


def encode_rows(rows, shape, task, tokenizer, vocab, *, split, max_len, truncation="right",
                on_empty_response="error", template=None, system_prompt=None):
    """(examples, dropped) for any task."""
    if task == "causal_lm":
        return encode_sft_rows(rows, shape, tokenizer, max_len=max_len, truncation=truncation,
                               on_empty_response=on_empty_response, template=template, system_prompt=system_prompt)
    encode = encode_sequence_rows if task == "sequence_classification" else encode_token_rows
    return encode(rows, tokenizer, vocab, split, max_len), 0


def make_batches(examples, task, tokenizer, *, batch_size, shuffle, seed=0, packing=False, max_len=0,
                 token_types=False):
    if task == "causal_lm":
        return SFTBatches(examples, batch_size, _pad_id(tokenizer), packing=packing, max_len=max_len,
                          shuffle=shuffle, seed=seed)
    return ClassificationBatches(examples, batch_size, _pad_id(tokenizer), shuffle=shuffle, seed=seed,
                                 token_types=token_types)


def make_eval_batches(rows, shape, task, tokenizer, vocab, *, split, max_len, batch_size, template=None,
                      system_prompt=None, token_types=False):
    """(a list of padded batches in row order, the conversations for generation or None).
    Evaluation never drops a row: truncation keeps the end of a conversation (its response)."""
    examples, _ = encode_rows(rows, shape, task, tokenizer, vocab, split=split, max_len=max_len, truncation="left",
                              template=template, system_prompt=system_prompt)
    batches = list(make_batches(examples, task, tokenizer, batch_size=batch_size, shuffle=False,
                                token_types=token_types).iter_once())
    conversations = ([row_messages(r, shape, system_prompt) for r in rows] if task == "causal_lm" else None)
    return batches, conversations


def text_tokens(source: Any, tokenizer: Tokenizer, text_field: str = "text") -> np.ndarray:
    """A 1-D token array: every document of `source` followed by EOS (the pretraining layout)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in iter_texts(source, text_field=text_field):
        ids += tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else [])
    return np.asarray(ids, dtype=np.int64)


def heldout_windows(source: Any, tokenizer: Tokenizer, block_size: int, batches: int, text_field: str = "text",
                    batch_size: int = 8) -> list[dict]:
    """Fixed pretraining windows for the forgetting report (the same ones before and after)."""
    windows = RandomWindowBatches(text_tokens(source, tokenizer, text_field), batch_size, block_size, seed=1234)
    return [windows.batch_at(i) for i in range(batches)]


# ---- evaluation during training --------------------------------------------------------------
class DevEvaluation:
    """Trainer callback: score the dev set every `every` steps (and at the end), keep the best
    weights by `metric` (in memory), stop early after `patience` evaluations without improvement,
    and report each score to a search trial's reporter (which may prune the trial)."""

    def __init__(self, score, metric: str, mode: str, every: int, *, patience: Optional[int] = None,
                 min_delta: float = 0.0, keep_best: bool = True, reporter=None, log_path: Optional[Path] = None,
                 verbose: bool = True):
        self.score, self.metric, self.mode, self.every = score, metric, mode, every
        self.patience, self.min_delta, self.keep_best = patience, min_delta, keep_best
        self.reporter, self.log_path, self.verbose = reporter, log_path, verbose
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_metrics: Optional[dict] = None
        self.best_state: Optional[dict] = None
        self.last_step: Optional[int] = None
        self.bad_evals = 0
        self.history: list[dict] = []
        self.pruned = False

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def evaluate(self, trainer, step: int) -> dict:
        metrics = self.score()
        if self.metric not in metrics:
            raise RecipeError(f"eval.metric={self.metric!r}: the dev evaluation gives "
                              f"{sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
        value = float(metrics[self.metric])
        self.last_step = step
        self.history.append({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(self.history[-1]) + "\n")
        improved = self._better(value)
        if improved:
            self.best_value, self.best_step, self.best_metrics, self.bad_evals = value, step, metrics, 0
            if self.keep_best:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
        else:
            self.bad_evals += 1
        if self.verbose:
            print(f"  dev @ step {step}: {self.metric} {value:.4f}"
                  f"{' (best)' if improved else f' (best {self.best_value:.4f} @ {self.best_step})'}", flush=True)
        if self.reporter is not None and self.reporter.report(step, value):
            self.pruned = True
            trainer.request_stop()
        if self.patience is not None and self.bad_evals >= self.patience:
            if self.verbose:
                print(f"  early stopping: {self.bad_evals} evaluations without improvement", flush=True)
            trainer.request_stop()
        return metrics

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if self.every and step % self.every == 0:
            self.evaluate(trainer, step)

    def on_train_end(self, trainer) -> None:
        if self.last_step != trainer.step:
            self.evaluate(trainer, trainer.step)

    def restore_best(self, model) -> None:
        if self.keep_best and self.best_state is not None:
            model.load_state_dict(self.best_state)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---- the job ---------------------------------------------------------------------------------
def run_finetune(recipe: FinetuneRecipe, *, reporter=None, verbose: bool = True) -> dict:
    """Fine-tune as the recipe says; returns the summary also written to <out_dir>/summary.json."""
    start = time.time()
    data, task, out = recipe.data, recipe.model.task, Path(recipe.train.out_dir)
    template = load_template(data.chat_template)
    train_rows, shape = load_rows(data.train, "train", data.format, task, data.columns, data.train_rows, data.seed)
    dev_rows = test_rows = None
    if data.dev is not None:
        dev_rows, _ = load_rows(data.dev, "dev", shape, task, data.columns, data.eval_rows, data.seed)
    elif data.dev_fraction > 0:
        train_rows, dev_rows = split_off(train_rows, data.dev_fraction, data.seed)
    if data.test is not None:
        test_rows, _ = load_rows(data.test, "test", shape, task, data.columns, data.eval_rows, data.seed)

    tokenizer = make_tokenizer(recipe, train_rows, shape, template)
    if template is not None:      # saved with the model, so `llmkit eval` and chat tools format alike
        tokenizer.chat_template = template
    vocab = None
    if task != "causal_lm":
        column = "label" if task == "sequence_classification" else "tags"
        vocab = LabelVocab(data.labels) if data.labels is not None else LabelVocab.from_rows(train_rows, column)
    examples, dropped = encode_rows(train_rows, shape, task, tokenizer, vocab, split="train", max_len=data.max_len,
                                    truncation=data.truncation, on_empty_response=data.on_empty_response,
                                    template=template, system_prompt=data.system_prompt)
    if dropped and verbose:
        print(f"dropped {dropped} of {len(train_rows)} training rows whose response truncation left empty "
              f"(data.max_len={data.max_len})")

    torch.manual_seed(recipe.train.seed)
    model = build_finetune_model(recipe.model, tokenizer, len(vocab) if vocab is not None else None)
    token_types = task == "sequence_classification" and model.config.type_vocab_size > 0
    train_batches = make_batches(examples, task, tokenizer, batch_size=data.batch_size, shuffle=True,
                                 seed=data.seed, packing=data.packing and task == "causal_lm", max_len=data.max_len,
                                 token_types=token_types)
    eval_size = data.eval_batch_size or data.batch_size
    dev = test = None
    if dev_rows is not None:
        dev = make_eval_batches(dev_rows, shape, task, tokenizer, vocab, split="dev", max_len=data.max_len,
                                batch_size=eval_size, template=template, system_prompt=data.system_prompt,
                                token_types=token_types)
    if test_rows is not None:
        test = make_eval_batches(test_rows, shape, task, tokenizer, vocab, split="test", max_len=data.max_len,
                                 batch_size=eval_size, template=template, system_prompt=data.system_prompt,
                                 token_types=token_types)

    handle = None
    if recipe.peft is not None:
        from .. import peft    # helper package; imported only when a recipe asks for it
        options = {k: v for k, v in recipe.peft.items() if k != "method"}
        handle = peft.apply(model, recipe.peft["method"], **options)

    def score(batches_and_conversations, generate_rows: Optional[int] = None) -> dict:
        batches, conversations = batches_and_conversations
        if task == "causal_lm":
            metrics = evaluate_lm(model, batches)
            if recipe.eval.generate:
                chosen = conversations if generate_rows is None else conversations[:generate_rows]
                metrics.update(evaluate_generation(model, tokenizer, chosen, template, recipe.eval.max_new_tokens))
            return metrics
        return evaluate_classification(model, batches, vocab.names)

    # ---- losses, forgetting remedies and report --------------------------------------------
    loss_fn = sft_loss if task == "causal_lm" else (
        sequence_classification_loss if task == "sequence_classification" else token_classification_loss)
    train_data: Any = train_batches
    forgetting = recipe.forgetting
    heldout = before = None
    if forgetting.heldout is not None:
        from .forgetting import heldout_perplexity
        heldout = heldout_windows(forgetting.heldout, tokenizer, forgetting.block_size, forgetting.batches,
                                  forgetting.text_field)
        before = heldout_perplexity(model, heldout, max_batches=forgetting.batches)
    if forgetting.mix_pretrain is not None:
        from .forgetting import PairedBatches, mixed_loss
        mix = forgetting.mix_pretrain
        tokens = text_tokens(mix["source"], tokenizer, mix.get("text_field", "text"))
        pretrain = RandomWindowBatches(tokens, mix.get("batch_size", data.batch_size),
                                       mix.get("block_size", forgetting.block_size), seed=recipe.train.seed)
        train_data = PairedBatches(train_batches, pretrain)
        loss_fn = mixed_loss(loss_fn, clm_loss, float(mix.get("weight", 1.0)))
    if forgetting.l2_init > 0:
        from .forgetting import L2ToInitial
        loss_fn = L2ToInitial(model, forgetting.l2_init).wrap(loss_fn)

    metric, mode = recipe.eval.resolved(task)
    config = recipe.train
    if recipe.epochs is not None:
        config = config.replace(max_steps=max(1, math.ceil(recipe.epochs * len(train_batches))))
    if not verbose:
        config = config.replace(progress=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    (out / "eval.jsonl").unlink(missing_ok=True)
    callback = None
    if dev is not None:
        callback = DevEvaluation(lambda: score(dev, recipe.eval.generate_rows), metric, mode,
                                 recipe.eval.eval_every, patience=recipe.eval.patience,
                                 min_delta=recipe.eval.min_delta, keep_best=recipe.eval.keep_best,
                                 reporter=reporter, log_path=out / "eval.jsonl", verbose=verbose)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        print(f"finetune: {task}, {type(model).__name__} {model.num_parameters() / 1e6:.2f}M parameters "
              f"({trainable / 1e6:.2f}M trainable), {len(examples)} training examples, {config.max_steps} steps "
              f"of batch {data.batch_size}, optimizer {config.optimizer}")
    trainer = Trainer(model, loss_fn, train_data, config=config, callbacks=[callback] if callback else [])
    train_start = time.time()
    result = trainer.fit()
    train_seconds = time.time() - train_start

    summary: dict = {"task": task, "status": "pruned" if callback is not None and callback.pruned else result.status,
                     "steps": result.step, "train_loss": result.train_loss, "train_examples": len(examples),
                     "dropped_rows": dropped, "parameters": model.num_parameters(), "trainable_parameters": trainable,
                     "train_seconds": round(train_seconds, 1), "metric": metric, "mode": mode}
    if callback is not None:
        summary.update(best_step=callback.best_step, best_value=callback.best_value)
        callback.restore_best(model)
        summary["dev"] = _scalars(callback.best_metrics or {})
        if callback.best_metrics and "confusion_matrix" in callback.best_metrics:
            summary["dev_confusion_matrix"] = callback.best_metrics["confusion_matrix"]
    if test is not None and summary["status"] != "pruned":
        test_metrics = score(test)
        summary["test"] = _scalars(test_metrics)
        if "confusion_matrix" in test_metrics:
            summary["test_confusion_matrix"] = test_metrics["confusion_matrix"]
    if heldout is not None:
        from .forgetting import forgetting_report, format_forgetting, heldout_perplexity
        after = heldout_perplexity(model, heldout, max_batches=forgetting.batches)
        summary["forgetting"] = forgetting_report(before, after)
        if verbose:
            print(format_forgetting(summary["forgetting"]))
    if recipe.save != "none" and summary["status"] != "pruned":
        if handle is not None:       # the adapter alone, then the model with it merged in
            handle.save(out / "adapter", format="llmkit")
            model = handle.merge_and_unload()
        save_finetuned(model, tokenizer, out / "model", fmt=recipe.save, labels=vocab.names if vocab else None)
    summary["seconds"] = round(time.time() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    tables = [format_metrics(summary[k], title=k) for k in ("dev", "test") if k in summary]
    (out / "metrics.md").write_text("\n\n".join(tables) + "\n")
    if verbose:
        for table in tables:
            print(table)
        print(f"done: {result.step} steps in {train_seconds:.0f} s; run folder {out}")
    return summary


def trial_metrics(summary: dict) -> dict:
    """The numbers a search trial reports: val/<dev metric>, test/<test metric>."""
    metrics = {f"val/{k}": v for k, v in summary.get("dev", {}).items()}
    metrics.update({f"test/{k}": v for k, v in summary.get("test", {}).items()})
    metrics["train/loss"] = summary.get("train_loss") or float("nan")
    return metrics
