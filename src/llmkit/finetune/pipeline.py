"""`llmkit finetune recipe.yaml`: fine-tuning on the Trainer, driven by the recipe's Task.

    rows (train / dev / test) -> tokenizer -> task.encode -> task.batches
    task.build_model: a checkpoint or a preset with the task's head (+ llmkit.peft with `peft:`)
    loss: task.loss (+ a pretraining mix, + an L2 pull to the initial weights: forgetting.py,
          + a PEFT method's penalty terms)
    Trainer: the dev set is its validation data and task.evaluate its evaluator; every
          train.eval_every steps the dev set is scored, the best weights (train.eval_metric, default
          the task's) are kept, early stopping after train.patience evaluations
    end: the best weights are restored, scored on dev and test, and saved with the tokenizer

The run folder (train.out_dir) gets model/ (+ adapter/ with peft), summary.json, metrics.md,
recipe.yaml, and the Trainer's metrics.jsonl (every dev evaluation as split "val"), TensorBoard
events, loss.png and checkpoints/.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import RandomWindowBatches, iter_texts
from ..jobs.peft_block import apply_peft_block
from ..jobs.tokenizers import setup_tokenizer
from ..objectives.clm import clm_loss
from ..recipes import RecipeError, to_yaml
from ..tokenizer import Tokenizer
from ..train import Trainer
from ..train.selection import scalars
from .data import LabelVocab, load_rows, split_off
from .metrics import format_metrics
from .recipe import FinetuneRecipe
from .sft import load_template
from .tasks import TaskOptions, make_task


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


class DevReport:
    """Trainer callback: print each dev score and report it to a search trial's reporter, which
    may prune the trial (the run then stops)."""

    def __init__(self, metric: str, reporter=None, verbose: bool = True):
        self.metric, self.reporter, self.verbose, self.pruned = metric, reporter, verbose, False

    def on_eval(self, trainer, step: int, metrics: dict) -> None:
        value = float(metrics[self.metric])
        if self.verbose:
            best = trainer.best
            print(f"  dev @ step {step}: {self.metric} {value:.4f}"
                  f"{' (best)' if best.step == step else f' (best {best.value:.4f} @ {best.step})'}", flush=True)
        if self.reporter is not None and self.reporter.report(step, value):
            self.pruned = True
            trainer.request_stop()


def run_finetune(recipe: FinetuneRecipe, *, reporter=None, verbose: bool = True) -> dict:
    """Fine-tune as the recipe says; returns the summary also written to <out_dir>/summary.json."""
    start = time.time()
    data, out = recipe.data, Path(recipe.train.out_dir)
    template = load_template(data.chat_template)
    name = recipe.model.task
    train_rows, shape = load_rows(data.train, "train", data.format, name, data.columns, data.train_rows, data.seed)
    dev_rows = test_rows = None
    if data.dev is not None:
        dev_rows, _ = load_rows(data.dev, "dev", shape, name, data.columns, data.eval_rows, data.seed)
    elif data.dev_fraction > 0:
        train_rows, dev_rows = split_off(train_rows, data.dev_fraction, data.seed)
    if data.test is not None:
        test_rows, _ = load_rows(data.test, "test", shape, name, data.columns, data.eval_rows, data.seed)

    options = TaskOptions(max_len=data.max_len, truncation=data.truncation, on_empty_response=data.on_empty_response,
                          packing=data.packing, template=template, system_prompt=data.system_prompt,
                          generate=recipe.eval.generate, max_new_tokens=recipe.eval.max_new_tokens,
                          pooling=recipe.model.pooling)
    task = make_task(name, options)
    if task.label_column is not None:
        task.labels = (LabelVocab(data.labels) if data.labels is not None
                       else LabelVocab.from_rows(train_rows, task.label_column))
    spec = recipe.model.tokenizer or recipe.model.checkpoint
    if spec is None:
        raise RecipeError("model.tokenizer: a preset needs a tokenizer: a folder / tokenizer.json, or `char` "
                          "to train a character tokenizer on the training rows")
    tokenizer = setup_tokenizer(spec, lambda: task.texts(train_rows, shape), field="model.tokenizer")
    if template is not None:      # saved with the model, so `llmkit eval` and chat tools format alike
        tokenizer.chat_template = template
    examples, dropped = task.encode(train_rows, shape, tokenizer, "train")
    if dropped and verbose:
        print(f"dropped {dropped} of {len(train_rows)} training rows whose response truncation left empty "
              f"(data.max_len={data.max_len})")

    torch.manual_seed(recipe.train.seed)
    model = task.build_model(recipe.model, tokenizer)
    train_batches = task.batches(examples, tokenizer, batch_size=data.batch_size, shuffle=True, seed=data.seed)
    eval_size = data.eval_batch_size or data.batch_size
    dev = task.eval_set(dev_rows, shape, tokenizer, eval_size) if dev_rows is not None else None
    test = task.eval_set(test_rows, shape, tokenizer, eval_size) if test_rows is not None else None
    handle = apply_peft_block(model, recipe.peft, tokenizer, loss_fn=task.loss,
                              data=lambda: iter(task.batches(examples, tokenizer, batch_size=data.batch_size,
                                                             shuffle=True, seed=data.seed + 1)))

    # ---- losses, forgetting remedies and report --------------------------------------------
    loss_fn: Any = task.loss
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
    callbacks = []
    if handle is not None:
        loss_fn = handle.wrap_loss(loss_fn)
        callbacks += handle.callbacks()

    config = recipe.train.replace(eval_metric=recipe.train.eval_metric or task.metric)
    if recipe.epochs is not None:
        config = config.replace(max_steps=max(1, math.ceil(recipe.epochs * len(train_batches))))
    if not verbose:
        config = config.replace(progress=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    report = DevReport(config.eval_metric, reporter, verbose)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        print(f"finetune: {name}, {type(model).__name__} {model.num_parameters() / 1e6:.2f}M parameters "
              f"({trainable / 1e6:.2f}M trainable), {len(examples)} training examples, {config.max_steps} steps "
              f"of batch {data.batch_size}, optimizer {config.optimizer}")
    generate_rows = recipe.eval.generate_rows
    trainer = Trainer(model, loss_fn, train_data, val_data=dev, config=config, callbacks=callbacks + [report],
                      evaluator=lambda m, d: task.evaluate(m, d, generate_rows=generate_rows))
    train_start = time.time()
    result = trainer.fit()                      # the best dev weights are restored at the end
    train_seconds = time.time() - train_start

    summary: dict = {"task": name, "status": "pruned" if report.pruned else result.status,
                     "steps": result.step, "train_loss": result.train_loss, "train_examples": len(examples),
                     "dropped_rows": dropped, "parameters": model.num_parameters(), "trainable_parameters": trainable,
                     "train_seconds": round(train_seconds, 1), "metric": config.eval_metric, "mode": trainer.best.mode}
    if dev is not None:
        summary.update(best_step=result.best_step, best_value=result.best_value)
        summary["dev"] = scalars(result.best_metrics or {})
        if result.best_metrics and "confusion_matrix" in result.best_metrics:
            summary["dev_confusion_matrix"] = result.best_metrics["confusion_matrix"]
    if test is not None and summary["status"] != "pruned":
        test_metrics = task.evaluate(model, test)
        summary["test"] = scalars(test_metrics)
        if "confusion_matrix" in test_metrics:
            summary["test_confusion_matrix"] = test_metrics["confusion_matrix"]
    if heldout is not None:
        from .forgetting import forgetting_report, format_forgetting, heldout_perplexity
        after = heldout_perplexity(model, heldout, max_batches=forgetting.batches)
        summary["forgetting"] = forgetting_report(before, after)
        if verbose:
            print(format_forgetting(summary["forgetting"]))
    if recipe.save != "none" and summary["status"] != "pruned":
        task.save(model, tokenizer, out / "model", fmt=recipe.save, handle=handle, adapter_dir=out / "adapter")
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
