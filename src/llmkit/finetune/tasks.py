"""Fine-tuning Tasks: one object per task carries everything the jobs need of it.

    task = make_task("sequence_classification", TaskOptions(max_len=64), labels=LabelVocab([...]))
    model = task.build_model(section, tokenizer)          # the checkpoint or preset + the task's head
    examples, dropped = task.encode(rows, shape, tokenizer, split="train")
    batches = task.batches(examples, tokenizer, batch_size=16, shuffle=True, seed=0)
    loss, metrics = task.loss(model, batch)
    metrics = task.evaluate(model, task.eval_set(rows, shape, tokenizer, batch_size=32))
    task.save(model, tokenizer, "out/model");  task, model, tokenizer = load_task("out/model")

| task                    | batches              | loss                                   | evaluate                      |
|-------------------------|----------------------|----------------------------------------|-------------------------------|
| causal_lm (SFT)         | SFTBatches           | CE over response tokens (sft.py)       | loss, ppl (+ exact match)     |
| sequence_classification | ClassificationBatches| CE of the pooled logits                | accuracy, P/R/F1, confusion   |
| token_classification    | ClassificationBatches| CE over first sub-tokens               | accuracy, P/R/F1, confusion   |
| seq2seq (BART)          | Seq2SeqBatches       | CE over response tokens (seq2seq.py)   | loss, token acc, exact match  |

A new task subclasses `Task` and adds itself to FINETUNE_TASKS.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..jobs.artifacts import HEADS, load_artifacts, save_artifacts
from ..model import CausalLM, Seq2SeqLM, build_model
from ..recipes import RecipeError
from ..tokenizer import Tokenizer, train_char
from .classification import (ClassificationBatches, encode_sequence_rows, encode_token_rows,
                             sequence_classification_loss, token_classification_loss)
from .data import LabelVocab, Row
from .loops import evaluate_classification, evaluate_generation, heldout_perplexity
from .seq2seq import Seq2SeqBatches, encode_seq2seq_rows, evaluate_seq2seq, seq2seq_loss
from .sft import SFTBatches, encode_sft_rows, row_messages, sft_loss


@dataclass
class TaskOptions:
    max_len: int = 128                   # tokens per example
    truncation: str = "right"            # training rows; evaluation keeps the end (the response)
    on_empty_response: str = "error"
    packing: bool = False
    template: Optional[str] = None       # SFT chat template (None: the tokenizer's)
    system_prompt: Optional[str] = None
    generate: bool = False               # SFT evaluation also scores greedy answers by exact match
    max_new_tokens: int = 32
    pooling: str = "auto"                # sequence classification: auto | cls | mean | last | bert_pooler


@dataclass
class EvalSet:
    batches: list
    tokenizer: Tokenizer
    conversations: Optional[list] = None  # SFT: for generation


class Task:
    name = ""
    metric = "accuracy"                  # the dev metric that picks the best weights by default
    label_column: Optional[str] = None   # classification: the column the label vocabulary comes from

    def __init__(self, options: Optional[TaskOptions] = None, labels: Optional[LabelVocab] = None):
        self.options, self.labels = options or TaskOptions(), labels
        self.token_types = False         # set by build_model: segment ids for models that have them

    def texts(self, rows: list[Row], shape: str) -> list[str]:
        """What a character tokenizer is trained on."""
        raise NotImplementedError

    def encode(self, rows: list[Row], shape: str, tokenizer: Tokenizer, split: str,
               truncation: Optional[str] = None) -> tuple[list, int]:
        raise NotImplementedError

    def batches(self, examples: list, tokenizer: Tokenizer, *, batch_size: int, shuffle: bool, seed: int = 0):
        raise NotImplementedError

    def loss(self, model, batch: dict):
        raise NotImplementedError

    def eval_set(self, rows: list[Row], shape: str, tokenizer: Tokenizer, batch_size: int) -> EvalSet:
        """Every row in order, in padded batches; truncation keeps the end of a conversation."""
        examples, _ = self.encode(rows, shape, tokenizer, "eval", truncation="left")
        batches = list(self.batches(examples, tokenizer, batch_size=batch_size, shuffle=False).iter_once())
        return EvalSet(batches, tokenizer)

    def evaluate(self, model, eval_set: EvalSet, generate_rows: Optional[int] = None) -> dict:
        """Metrics of `model` on the set (SFT generation answers the first `generate_rows` rows)."""
        raise NotImplementedError

    def build_model(self, section, tokenizer: Tokenizer):
        raise NotImplementedError

    def save(self, model, tokenizer: Tokenizer, directory: Union[str, Path], *, fmt: str = "auto", handle=None,
             adapter_dir=None):
        labels = self.labels.names if self.labels is not None else None
        return save_artifacts(directory, model, tokenizer, job="finetune", task=self.name, labels=labels, fmt=fmt,
                              handle=handle, adapter_dir=adapter_dir)


class CausalSFT(Task):
    name, metric = "causal_lm", "loss"

    def texts(self, rows, shape):
        probe = Tokenizer(train_char(texts=["x"]).backend, {"eos": "<|endoftext|>"})
        return [probe.apply_chat_template(row_messages(r, shape, self.options.system_prompt),
                                          chat_template=self.options.template) for r in rows]

    def encode(self, rows, shape, tokenizer, split, truncation=None):
        o = self.options
        return encode_sft_rows(rows, shape, tokenizer, max_len=o.max_len, truncation=truncation or o.truncation,
                               on_empty_response=o.on_empty_response if truncation is None else "error",
                               template=o.template, system_prompt=o.system_prompt)

    def batches(self, examples, tokenizer, *, batch_size, shuffle, seed=0):
        return SFTBatches(examples, batch_size, tokenizer.pad_id, packing=self.options.packing and shuffle,
                          max_len=self.options.max_len, shuffle=shuffle, seed=seed)

    def loss(self, model, batch):
        return sft_loss(model, batch)

    def eval_set(self, rows, shape, tokenizer, batch_size):
        evaluation = super().eval_set(rows, shape, tokenizer, batch_size)
        evaluation.conversations = [row_messages(r, shape, self.options.system_prompt) for r in rows]
        return evaluation

    def evaluate(self, model, eval_set, generate_rows=None):
        metrics = heldout_perplexity(model, eval_set.batches)
        if self.options.generate:
            rows = eval_set.conversations[:generate_rows]
            metrics.update(evaluate_generation(model, eval_set.tokenizer, rows, self.options.template,
                                               self.options.max_new_tokens))
        return metrics

    def build_model(self, section, tokenizer):
        if section.checkpoint is None:
            return build_model(section.config(tokenizer), "causal_lm")
        model = load_artifacts(section.checkpoint).model
        if not isinstance(model, CausalLM):
            raise RecipeError(f"model.from={section.checkpoint!r} holds a {type(model).__name__}: task causal_lm "
                              "needs a decoder (CausalLM) checkpoint")
        return model.train()


class _Classification(Task):
    encode_rows = staticmethod(encode_sequence_rows)
    loss_fn = staticmethod(sequence_classification_loss)

    def texts(self, rows, shape):
        if shape == "text_label":
            return [r.values["text"] + (r.values.get("text_pair") or "") for r in rows]
        return [" ".join(r.values["tokens"]) for r in rows]

    def encode(self, rows, shape, tokenizer, split, truncation=None):
        return self.encode_rows(rows, tokenizer, self.labels, split, self.options.max_len), 0

    def batches(self, examples, tokenizer, *, batch_size, shuffle, seed=0):
        return ClassificationBatches(examples, batch_size, tokenizer.pad_id, shuffle=shuffle, seed=seed,
                                     token_types=self.token_types)

    def loss(self, model, batch):
        return self.loss_fn(model, batch)

    def evaluate(self, model, eval_set, generate_rows=None):
        return evaluate_classification(model, eval_set.batches, self.labels.names)

    def head_options(self, backbone) -> dict:
        return {"n_labels": len(self.labels)}

    def build_model(self, section, tokenizer):
        """The checkpoint's (or preset's) transformer stack under a new head, or a saved model of
        this task as it is."""
        n_labels = len(self.labels)
        if section.checkpoint is not None:
            saved = load_artifacts(section.checkpoint)
            head = saved.manifest.get("head") or {}
            if head:
                if head.get("kind") != self.name or head.get("n_labels") != n_labels:
                    raise RecipeError(f"model.from={section.checkpoint!r} is a {head.get('kind')} model with "
                                      f"{head.get('n_labels')} labels: expected task {self.name!r} with {n_labels} labels")
                return self._with_types(saved.model.train())
            backbone = saved.model
        else:
            backbone = build_model(section.config(tokenizer))
        if not hasattr(backbone, "transformer") or getattr(backbone.config, "is_encoder_decoder", False):
            raise RecipeError(f"model: {type(backbone).__name__} has no single transformer stack to put a "
                              f"{self.name} head on (encoder-decoder models are not supported here)")
        options = self.head_options(backbone)
        model = HEADS[self.name][2](backbone.config, options)
        model.transformer.load_state_dict(backbone.transformer.state_dict())
        if options.get("bert_pooler"):
            model.pooler.load_state_dict(backbone.pooler.state_dict())
        return self._with_types(model.train())

    def _with_types(self, model):
        self.token_types = self.name == "sequence_classification" and model.config.type_vocab_size > 0
        return model


class SequenceClassification(_Classification):
    name, label_column = "sequence_classification", "label"

    def head_options(self, backbone):
        pooling = self.options.pooling
        has_pooler = getattr(backbone, "pooler", None) is not None
        if pooling == "bert_pooler" and not has_pooler:
            raise RecipeError("model.pooling='bert_pooler': the checkpoint has no pooler; expected cls, mean or last")
        return {"n_labels": len(self.labels), "pooling": None if pooling in ("auto", "bert_pooler") else pooling,
                "bert_pooler": has_pooler and pooling in ("auto", "bert_pooler")}


class TokenClassification(_Classification):
    name, label_column = "token_classification", "tags"
    encode_rows = staticmethod(encode_token_rows)
    loss_fn = staticmethod(token_classification_loss)


class Seq2Seq(Task):
    """prompt -> response on an encoder-decoder (BART): see seq2seq.py."""
    name, metric = "seq2seq", "loss"

    def texts(self, rows, shape):
        return [str(r.values["prompt"]) + str(r.values["response"]) for r in rows]

    def encode(self, rows, shape, tokenizer, split, truncation=None):
        if shape != "prompt_response":
            raise RecipeError(f"model.task=seq2seq: expected prompt/response rows, found the {shape} shape")
        return encode_seq2seq_rows(rows, tokenizer, max_len=self.options.max_len), 0

    def batches(self, examples, tokenizer, *, batch_size, shuffle, seed=0):
        return Seq2SeqBatches(examples, batch_size, tokenizer.pad_id, self.start, shuffle=shuffle, seed=seed)

    def loss(self, model, batch):
        return seq2seq_loss(model, batch)

    def evaluate(self, model, eval_set, generate_rows=None):
        return evaluate_seq2seq(model, eval_set.batches, self.options.max_new_tokens)

    def build_model(self, section, tokenizer):
        if section.checkpoint is None:
            model = build_model(section.config(tokenizer), "seq2seq_lm")
        else:
            model = load_artifacts(section.checkpoint).model
        if not isinstance(model, Seq2SeqLM):
            raise RecipeError(f"model.from={section.checkpoint!r} holds a {type(model).__name__}: task seq2seq "
                              "needs an encoder-decoder (Seq2SeqLM, e.g. BART) checkpoint")
        config = model.config                # BART starts decoding from </s> when nothing else is set
        if config.decoder_start_token_id is None:
            config.decoder_start_token_id = config.bos_token_id if config.bos_token_id is not None else \
                config.eos_token_id
        self.start = config.decoder_start_token_id
        return model.train()


FINETUNE_TASKS: dict[str, type] = {t.name: t for t in (CausalSFT, SequenceClassification, TokenClassification,
                                                        Seq2Seq)}


def make_task(name: str, options: Optional[TaskOptions] = None, labels: Optional[LabelVocab] = None) -> Task:
    if name not in FINETUNE_TASKS:
        raise RecipeError(f"model.task={name!r}: expected one of {list(FINETUNE_TASKS)}")
    return FINETUNE_TASKS[name](options, labels)


def load_task(directory: Union[str, Path], options: Optional[TaskOptions] = None):
    """(task, model, tokenizer) of a folder a Task saved (or any causal-LM checkpoint)."""
    saved = load_artifacts(directory)
    name = saved.task
    if name not in FINETUNE_TASKS:
        raise RecipeError(f"model={str(directory)!r} holds a {name} model: expected one of {list(FINETUNE_TASKS)}")
    labels = saved.manifest.get("labels")
    task = make_task(name, options, LabelVocab(labels, origin="the checkpoint's labels") if labels else None)
    if isinstance(task, _Classification):
        task._with_types(saved.model)
    if isinstance(task, Seq2Seq):
        task.start = saved.model.config.decoder_start_token_id
    return task, saved.model, saved.tokenizer
