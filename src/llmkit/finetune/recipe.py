"""`FinetuneRecipe`: the YAML schema of `llmkit finetune` / `llmkit eval` / `llmkit tune`.

    model:      from: path/to/checkpoint (HF or llmkit) | preset: llama-tiny (+ ModelConfig fields)
                task: causal_lm | sequence_classification | token_classification | seq2seq; tokenizer; pooling
    data:       train / dev / test sources, column mapping, max_len, packing, truncation policy
    train:      any TrainConfig field (optimizer, lr, steps, schedule, ...; eval_every, eval_metric,
                keep_best, patience: the dev evaluation, best weights and early stopping)
    eval:       SFT generation during evaluation (generate, max_new_tokens, generate_rows)
    forgetting: held-out pretraining text for the before/after report; pretraining mix; L2 to init
    search:     (optional) the hyperparameter search `llmkit tune` runs (llmkit.finetune.search)
    peft:       (optional) {method: lora, **options}: llmkit.peft.apply(model, method, **options)

Every key is checked by `llmkit.recipes.build`: an unknown key names the closest valid one, a bad
value names the dotted field, the value and what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..jobs.model_section import ModelSection, rename_from
from ..jobs.peft_block import check_peft_block
from ..recipes import build
from ..train import TrainConfig
from .tasks import FINETUNE_TASKS

FORMATS = ("auto", "prompt_response", "messages", "text_label", "tokens_tags")
POOLINGS = ("auto", "cls", "mean", "last", "bert_pooler")


def _choice(section: str, name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name}={value!r}: expected one of {list(allowed)}")


@dataclass
class FinetuneModelSection(ModelSection):
    task: str = "causal_lm"
    tokenizer: Optional[str] = None      # default: the checkpoint folder; `char` trains one on the data
    pooling: str = "auto"                # sequence classification: auto = BERT pooler if the checkpoint
                                         # has one, else cls (encoders) / last (decoders)

    def __post_init__(self):
        super().__post_init__()
        _choice("model", "task", self.task, FINETUNE_TASKS)
        _choice("model", "pooling", self.pooling, POOLINGS)


@dataclass
class FinetuneData:
    train: Any = None                    # a path (jsonl/json/csv/tsv, .gz), a list of row dicts,
    dev: Any = None                      # {hf: name_or_path, split: train, name: config} or an HF Dataset
    test: Any = None
    format: str = "auto"                 # auto: from the task and the columns found
    columns: dict = field(default_factory=dict)   # our name -> the source's column ({text: sentence})
    labels: Optional[list] = None        # the label vocabulary; default: the values seen in train
    train_rows: Optional[int] = None     # a seeded random subset of train (None: all rows)
    eval_rows: Optional[int] = None      # the same cap for dev and test
    dev_fraction: float = 0.0            # hold out this share of train as dev when there is no dev source
    seed: int = 0
    max_len: int = 128                   # tokens per example (prompt + response, or text)
    batch_size: int = 16
    eval_batch_size: Optional[int] = None
    packing: bool = False                # SFT: several examples per row, attention kept inside each
    truncation: str = "right"            # right: cut the end; left: cut the start (keeps the response)
    on_empty_response: str = "error"     # a response truncated to nothing: error, or drop (and count)
    chat_template: Optional[str] = None  # a Jinja template (or a .jinja file); default: the tokenizer's
    system_prompt: Optional[str] = None  # prepended as a system message to prompt/response rows

    def __post_init__(self):
        _choice("data", "format", self.format, FORMATS)
        _choice("data", "truncation", self.truncation, ("right", "left"))
        _choice("data", "on_empty_response", self.on_empty_response, ("error", "drop"))
        for name in ("max_len", "batch_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"data.{name}={getattr(self, name)!r}: expected an integer >= 2")
        for name in ("train_rows", "eval_rows", "eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)!r}: expected a positive integer or null")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"data.dev_fraction={self.dev_fraction!r}: expected a number in [0, 1)")
        for key, value in self.columns.items():
            if not isinstance(value, str):
                raise ValueError(f"data.columns.{key}={value!r}: expected the source's column name (a string)")


@dataclass
class GenerationSection:
    """SFT dev/test evaluation by greedy generation (the metric, its schedule, keep-best and early
    stopping are `train.eval_metric`, `train.eval_every`, `train.keep_best`, `train.patience`)."""
    generate: bool = False               # causal LM: also greedy-generate and score exact match
    max_new_tokens: int = 32
    generate_rows: Optional[int] = 200   # rows scored by generation per evaluation (None: all)


@dataclass
class ForgettingSection:
    heldout: Any = None                  # pretraining text (path / list) for the before/after report
    text_field: str = "text"
    block_size: int = 128
    batches: int = 20                    # held-out windows per report
    mix_pretrain: Optional[dict] = None  # {source, weight, text_field?, batch_size?, block_size?}
    l2_init: float = 0.0                 # (coef / 2) * ||theta - theta_0||^2 added to the loss

    def __post_init__(self):
        if self.l2_init < 0:
            raise ValueError(f"forgetting.l2_init={self.l2_init!r}: expected a non-negative number")
        if self.mix_pretrain is not None:
            unknown = set(self.mix_pretrain) - {"source", "weight", "text_field", "batch_size", "block_size"}
            if "source" not in self.mix_pretrain or unknown:
                raise ValueError(f"forgetting.mix_pretrain={self.mix_pretrain!r}: expected {{source, weight}} "
                                 "(optional text_field, batch_size, block_size)")


@dataclass
class FinetuneRecipe:
    model: FinetuneModelSection = field(default_factory=lambda: FinetuneModelSection(preset="llama-tiny"))
    data: FinetuneData = field(default_factory=FinetuneData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/finetune"))
    eval: GenerationSection = field(default_factory=GenerationSection)
    forgetting: ForgettingSection = field(default_factory=ForgettingSection)
    epochs: Optional[float] = None       # passes over the training rows; sets train.max_steps when given
    search: Optional[dict] = None        # SearchConfig fields (llmkit.finetune.search)
    peft: Optional[dict] = None          # {method: lora, **options}
    save: str = "auto"                   # auto (HF where the layout exists, else llmkit) | hf | llmkit | none

    def __post_init__(self):
        _choice("recipe", "save", self.save, ("auto", "hf", "llmkit", "none"))
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs={self.epochs!r}: expected a positive number of passes (or null)")
        if self.data.train is None:
            raise ValueError("data.train=None: expected a training source (a path, rows or {hf: ...})")
        check_peft_block(self.peft)
        if self.forgetting.mix_pretrain is not None and self.model.task != "causal_lm":
            raise ValueError("forgetting.mix_pretrain: mixing in pretraining text needs model.task=causal_lm, "
                             f"found {self.model.task!r}")


def parse_finetune_recipe(data: dict) -> FinetuneRecipe:
    """A mapping (YAML + overrides) -> FinetuneRecipe; `model.from` is the field `model.checkpoint`."""
    return build(FinetuneRecipe, rename_from(data))
