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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import ModelConfig
from .data import iter_texts
from .data.images import shape_captions
from .data.synthetic import SyntheticTasks
from .generation import generate
from .io import load_any
from .jobs.artifacts import save_artifacts
from .jobs.model_section import ModelSection, rename_from
from .jobs.tokenizers import setup_tokenizer
from .model import build_model
from .objectives import make_objective
from .objectives.base import build_once
from .recipes import build, to_yaml
from .tokenizer import Tokenizer, load_tokenizer
from .train import TrainConfig, Trainer, load_model_tensors
from .train.distributed import rank_and_world_size


@dataclass
class PretrainData:
    source: Any = "synthetic"          # path, list of paths/globs, or "synthetic" (llmkit.data.synthetic)
    text_field: str = "text"           # jsonl / datasets column
    split_lines: Union[bool, str] = False
    tokenizer: str = "char"            # char | bpe | a tokenizer.json file or folder
    vocab_size: int = 4096             # bpe only
    block_size: int = 128
    batch_size: int = 16               # global batch (split across ranks under torchrun)
    val_fraction: float = 0.1
    sampling: str = "random"           # random windows (nanoGPT) | packed (epochs over blocks)
    separate_documents: bool = False   # packed windows: positions restart and attention stops at each EOS
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
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="gpt2-tiny"))
    data: PretrainData = field(default_factory=PretrainData)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: Union[str, dict] = "clm"  # a name, or {name: weight, ...} for a weighted mix
    samples: int = 2                   # texts generated at the end, printed and saved
    sample_tokens: int = 120
    sample_prompt: str = ""

    def __post_init__(self):
        make_objective(self.objective)  # raises naming the objective and the known ones


def parse_recipe(data: dict) -> PretrainRecipe:
    return build(PretrainRecipe, rename_from(data))


def pretrain_tokenizer(data: PretrainData, texts_source: Any, roles: Optional[dict] = None) -> Tokenizer:
    return setup_tokenizer(data.tokenizer, lambda: iter_texts(texts_source, text_field=data.text_field,
                                                              split_lines=data.split_lines),
                           roles=roles, vocab_size=data.vocab_size, field="data.tokenizer")


def build_pretrain_model(section: ModelSection, tokenizer: Tokenizer, objective: Any = None,
                         config: Optional[ModelConfig] = None):
    """The model the section (or a given `config`) describes, with the head the objective trains."""
    if section.checkpoint is not None and config is None:
        return load_any(section.checkpoint)
    config = config or section.config(tokenizer)
    if hasattr(objective, "build_model"):
        return objective.build_model(config)  # objectives with a model of their own (multimodal)
    return build_model(config, objective.task if objective is not None else "causal_lm")


@dataclass
class PretrainSetup:
    """Everything a pretraining run needs, built from a recipe (the demo uses it step by step)."""
    recipe: PretrainRecipe
    objective: Any
    tokenizer: Tokenizer
    model: Any
    train_batches: Any
    val_data: Any
    out_dir: Path
    rank: int = 0

    def trainer(self, **overrides) -> Trainer:
        config = dataclasses.replace(self.recipe.train, **overrides) if overrides else self.recipe.train
        return Trainer(self.model, self.objective.loss, self.train_batches, val_data=self.val_data, config=config)


def prepare_pretraining(recipe: PretrainRecipe) -> PretrainSetup:
    """Tokenizer, token shards (rank 0 builds, other ranks wait), batches and the model."""
    rank, world = rank_and_world_size()
    out = Path(recipe.train.out_dir)
    data = recipe.data
    source = data.source
    tokenizer_texts = source
    if source == "synthetic":
        source = tokenizer_texts = SyntheticTasks(seed=data.seed).pretraining_text(data.synthetic_examples,
                                                                                   include_world=True)
    elif source == "shapes":  # synthetic images with captions: the objective draws them itself
        tokenizer_texts = shape_captions(2000, data.seed)
    data = dataclasses.replace(data, cache_dir=str(Path(data.cache_dir) if data.cache_dir else out / "data"))
    tokenizer_dir = Path(data.cache_dir) / "tokenizer"

    objective = make_objective(recipe.objective)

    def train_tokenizer():
        pretrain_tokenizer(data, tokenizer_texts, getattr(objective, "special_tokens", None)).save(tokenizer_dir)
    build_once(rank, tokenizer_dir / "special_tokens_map.json", train_tokenizer)  # written last
    tokenizer = load_tokenizer(tokenizer_dir)
    made = objective.make_data(source, tokenizer, data, rank=rank, world_size=world, seed=recipe.train.seed,
                               eval_batches=recipe.train.eval_batches)

    torch.manual_seed(recipe.train.seed)
    model = build_pretrain_model(recipe.model, tokenizer, objective)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(to_yaml(recipe))
        print(f"model: {type(model).__name__} ({model.config.family} layout), "
              f"{model.num_parameters() / 1e6:.2f}M parameters")
    return PretrainSetup(recipe, objective, tokenizer, model, made.train, made.val, out, rank)


def run_pretrain(recipe: PretrainRecipe) -> dict:
    setup = prepare_pretraining(recipe)
    start = time.time()
    result = setup.trainer().fit()
    seconds = time.time() - start
    summary = {"status": result.status, "step": result.step, "train_loss": result.train_loss,
               "val_loss": result.val_loss, "seconds": round(seconds, 1)}
    if recipe.train.compile:
        summary["compile_seconds"] = round(result.compile_seconds, 1)   # inside "seconds"
    if setup.rank == 0:
        model = setup.model
        if recipe.train.distributed == "fsdp":  # the trained module is sharded: export the full
            model = build_pretrain_model(recipe.model, setup.tokenizer, setup.objective,
                                         config=model.config)  # state rank 0 wrote at the end
            model.load_state_dict(load_model_tensors(result.checkpoint))
        save_artifacts(setup.out_dir / "model", model, setup.tokenizer, job="pretrain", task=setup.objective.task)
        if setup.objective.task == "causal_lm":
            summary["samples"] = write_samples(model, setup.tokenizer, recipe, setup.out_dir)
        compiled = f" (of which compiling {result.compile_seconds:.1f} s)" if recipe.train.compile else ""
        print(f"done: step {result.step}, val loss {result.val_loss}, {seconds:.0f} s{compiled}; "
              f"model in {setup.out_dir / 'model'}")
    return summary


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
