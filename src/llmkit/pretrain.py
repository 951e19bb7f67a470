"""`llmkit pretrain recipe.yaml [key=value ...]`: pretrain a model from a recipe.

A recipe has four sections (see recipes/*.yaml):

    model:     preset: gpt2-tiny | from: path/to/checkpoint, plus any ModelConfig field
    data:      source (a path, a list of paths, or "synthetic"), tokenizer, block/batch sizes, split
    train:     any TrainConfig field (optimizer, lr, schedule, steps, precision, checkpoints, ...)
    objective: clm (the pretraining objectives issue adds the others)

The job trains (or loads) the tokenizer, tokenizes the corpus once into memmap shards, builds the
model, runs the Trainer and leaves in `train.out_dir`: `model/` (Hugging Face format when the
family has one, else llmkit's own) with the tokenizer, `recipe.yaml`, `metrics.jsonl`,
TensorBoard events, `loss.png` and `checkpoints/`.
"""
from __future__ import annotations

import dataclasses
import difflib
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import ConfigError, ModelConfig
from .data import PackedBatches, RandomWindowBatches, build_shards, iter_texts, load_shards
from .data.synthetic import SyntheticTasks
from .generation import generate
from .io import load_any, save_hf, save_llmkit
from .io.errors import CheckpointError
from .io.hf import task_of
from .model import build_model
from .objectives.clm import clm_loss
from .presets import get_preset
from .recipes import RecipeError, build, coerce, to_yaml
from .tokenizer import Tokenizer, load_tokenizer, train_bpe, train_char
from .train import TrainConfig, Trainer, load_model_tensors
from .train.distributed import rank_and_world_size

OBJECTIVES = {"clm": clm_loss}


@dataclass
class DataSection:
    source: Any = "synthetic"          # path, list of paths/globs, or "synthetic" (llmkit.data.synthetic)
    text_field: str = "text"           # jsonl / datasets column
    split_lines: Union[bool, str] = False
    tokenizer: str = "char"            # char | bpe | a tokenizer.json file or folder
    vocab_size: int = 4096             # bpe only
    block_size: int = 128
    batch_size: int = 16               # global batch (split across ranks under torchrun)
    val_fraction: float = 0.1
    sampling: str = "random"           # random windows (nanoGPT) | packed (epochs over blocks)
    synthetic_examples: int = 20000    # lines of synthetic text when source = synthetic
    cache_dir: Optional[str] = None    # token shards; default <train.out_dir>/data
    seed: int = 0

    def __post_init__(self):
        if self.sampling not in ("random", "packed"):
            raise ValueError(f"data.sampling={self.sampling!r}: expected 'random' or 'packed'")
        for name in ("block_size", "batch_size", "vocab_size", "synthetic_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name}={getattr(self, name)!r}: expected a positive integer")


@dataclass
class PretrainRecipe:
    model: dict = field(default_factory=lambda: {"preset": "gpt2-tiny"})
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: str = "clm"
    samples: int = 2                   # texts generated at the end, printed and saved
    sample_tokens: int = 120
    sample_prompt: str = ""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: expected one of {sorted(OBJECTIVES)}")


def parse_recipe(data: dict) -> PretrainRecipe:
    recipe = build(PretrainRecipe, data)
    check_model_section(recipe.model)
    return recipe


def check_model_section(section: dict) -> None:
    """The model section is ModelConfig fields plus `preset` or `from`: check keys and types now,
    before any data is tokenized."""
    hints = typing.get_type_hints(ModelConfig)
    for key, value in section.items():
        if key in ("preset", "from"):
            if not isinstance(value, str):
                raise RecipeError(f"model.{key}={value!r}: expected str")
            continue
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints) + ["preset", "from"], n=1, cutoff=0.5)
            raise RecipeError(f"unknown recipe key 'model.{key}'" + (f"; did you mean {close[0]!r}?" if close else ""))
        coerce(hints[key], value, f"model.{key}")


def make_tokenizer(data: DataSection, texts_source: Any) -> Tokenizer:
    if data.tokenizer == "char":
        return train_char(texts=list(iter_texts(texts_source, text_field=data.text_field, split_lines=data.split_lines)),
                          special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    if data.tokenizer == "bpe":
        return train_bpe(texts=iter_texts(texts_source, text_field=data.text_field, split_lines=data.split_lines),
                         vocab_size=data.vocab_size, special_tokens=("<|endoftext|>", "<pad>"), pad_token="<pad>")
    return load_tokenizer(data.tokenizer)


def build_model_from_section(section: dict, tokenizer: Tokenizer):
    fields = {k: v for k, v in section.items() if k not in ("preset", "from")}
    if "from" in section:
        model = load_any(section["from"])
        if fields:
            raise RecipeError(f"model: fields {sorted(fields)} cannot change a checkpoint loaded with 'from'")
        return model
    fields.setdefault("vocab_size", tokenizer.vocab_size)
    for name, token_id in (("eos_token_id", tokenizer.eos_token_id), ("pad_token_id", tokenizer.pad_token_id)):
        fields.setdefault(name, token_id)
    try:
        config = get_preset(section.get("preset", "gpt2-tiny"), **fields)
    except ConfigError as exc:
        raise RecipeError(f"model: {exc}") from exc
    return build_model(config, "causal_lm")


@dataclass
class PretrainSetup:
    """Everything a pretraining run needs, built from a recipe (the demo uses it step by step)."""
    recipe: PretrainRecipe
    tokenizer: Tokenizer
    model: Any
    train_batches: Any
    val_data: Any
    out_dir: Path
    rank: int = 0

    def trainer(self, **overrides) -> Trainer:
        config = dataclasses.replace(self.recipe.train, **overrides) if overrides else self.recipe.train
        return Trainer(self.model, OBJECTIVES[self.recipe.objective], self.train_batches,
                       val_data=self.val_data, config=config)


def prepare_pretraining(recipe: PretrainRecipe) -> PretrainSetup:
    """Tokenizer, token shards (rank 0 builds, other ranks wait), batches and the model."""
    rank, world = rank_and_world_size()
    out = Path(recipe.train.out_dir)
    data = recipe.data
    source = data.source
    if source == "synthetic":
        source = SyntheticTasks(seed=data.seed).pretraining_text(data.synthetic_examples, include_world=True)
    cache = Path(data.cache_dir) if data.cache_dir else out / "data"
    if rank == 0:
        tokenizer = make_tokenizer(data, source)
        tokenizer.save(cache / "tokenizer")
        shards = build_shards(source, tokenizer, cache, val_fraction=data.val_fraction, seed=data.seed,
                              text_field=data.text_field, split_lines=data.split_lines)
        print(f"data: {shards.train_tokens:,} train / {shards.val_tokens:,} val tokens, "
              f"vocab {tokenizer.vocab_size} ({'reused' if shards.reused else 'built'} in {cache})")
    else:  # the other ranks wait for rank 0's build: meta.json is written last
        _wait_for(cache / "meta.json")
        tokenizer = load_tokenizer(cache / "tokenizer")
    train_tokens, val_tokens = load_shards(cache, "train"), load_shards(cache, "val")

    batches = RandomWindowBatches if data.sampling == "random" else PackedBatches
    train_batches = batches(train_tokens, data.batch_size, data.block_size, seed=recipe.train.seed,
                            rank=rank, world_size=world)
    # Validation: the same fixed windows at every evaluation, so val curves compare across steps.
    val_windows = RandomWindowBatches(val_tokens, data.batch_size, data.block_size, seed=12345, rank=rank,
                                      world_size=world)
    val_data = lambda: (val_windows.batch_at(i) for i in range(recipe.train.eval_batches))  # noqa: E731

    torch.manual_seed(recipe.train.seed)
    model = build_model_from_section(recipe.model, tokenizer)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(to_yaml(recipe))
        print(f"model: {type(model).__name__} ({model.config.family} layout), "
              f"{model.num_parameters() / 1e6:.2f}M parameters")
    return PretrainSetup(recipe, tokenizer, model, train_batches, val_data, out, rank)


def run_pretrain(recipe: PretrainRecipe) -> dict:
    setup = prepare_pretraining(recipe)
    start = time.time()
    result = setup.trainer().fit()
    seconds = time.time() - start
    summary = {"status": result.status, "step": result.step, "train_loss": result.train_loss,
               "val_loss": result.val_loss, "seconds": round(seconds, 1)}
    if setup.rank == 0:
        model = setup.model
        if recipe.train.distributed == "fsdp":  # the trained module is sharded: export the full
            model = build_model(model.config, task_of(model))  # state rank 0 wrote at the end
            model.load_state_dict(load_model_tensors(result.checkpoint))
        save_model(model, setup.tokenizer, setup.out_dir / "model")
        summary["samples"] = write_samples(model, setup.tokenizer, recipe, setup.out_dir)
        print(f"done: step {result.step}, val loss {result.val_loss}, {seconds:.0f} s; "
              f"model in {setup.out_dir / 'model'}")
    return summary


def save_model(model, tokenizer: Tokenizer, directory: Path) -> None:
    """Hugging Face format when the family's layout holds the config, else llmkit's own."""
    try:
        save_hf(model, directory)
    except CheckpointError:
        save_llmkit(model, directory)
    tokenizer.save(directory)


def write_samples(model, tokenizer: Tokenizer, recipe: PretrainRecipe, out: Path) -> list[str]:
    texts = []
    eos = tokenizer.eos_token_id
    for i in range(recipe.samples):
        prompt_ids = tokenizer.encode(recipe.sample_prompt, add_special_tokens=False) or [eos]
        ids = torch.tensor([prompt_ids])
        limit = recipe.sample_tokens
        if model.config.positional in ("learned", "sinusoidal"):
            limit = min(limit, model.config.max_seq_len - ids.shape[1])
        sample = generate(model, ids, max_new_tokens=limit, do_sample=True, top_k=50,
                          generator=torch.Generator().manual_seed(i))
        texts.append(tokenizer.decode(sample[0].tolist()))
        print(f"--- sample {i + 1} ---\n{texts[-1]}")
    (out / "samples.txt").write_text("\n\n".join(texts))
    return texts


def _wait_for(path: Path, timeout: float = 3600.0) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for rank 0 to write {path}")
        time.sleep(0.5)
