"""`llmkit align recipe.yaml [key=value ...]`: reward modelling, DPO, IPO, KTO or ORPO from a recipe.

    method:    rm | dpo | ipo | kto | orpo
    options:   the method's loss options (dpo: beta, label_smoothing, loss_type, nll_coef; ipo: tau,
               length_normalize, nll_coef; kto: beta, lambda_d, lambda_u, nll_coef; orpo: lam;
               rm: margin, center_coef)
    reference: copy (a frozen copy; with peft: the adapter-free model) | precomputed (dpo/ipo:
               log-probs computed once before training, no reference kept in memory)
    model:     from: a checkpoint folder (its tokenizer too) | preset + ModelConfig fields (a fresh
               model and a character tokenizer trained on the data: a smoke run)
    data:      source (synthetic | a .jsonl/.jsonl.gz/.json file), lengths, batch size, split
    train:     any TrainConfig field
    peft:      optional {method: lora, r: 8, alpha: 16, targets: [q_proj, v_proj], ...} -> llmkit.peft.apply

Leaves in train.out_dir: model/ (merged weights when peft, Hugging Face format + tokenizer),
recipe.yaml, metrics.jsonl, TensorBoard events, loss.png, checkpoints/, summary.json.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.synthetic import SyntheticTasks
from ..recipes import RecipeError, build, to_yaml
from ..tokenizer import load_tokenizer, train_char
from ..train import TrainConfig, Trainer
from .data import PreferenceBatches, normalize_rows, read_rows, to_unpaired, tokenize_rows
from .objectives import METHODS, frozen_copy, make_objective, precompute_reference_logps, reward_model_from


@dataclass
class AlignData:
    source: Any = "synthetic"          # "synthetic" (SyntheticTasks.preference_pairs) or a file of rows
    synthetic_examples: int = 2000
    synthetic_tasks: Optional[list] = None   # subset of SyntheticTasks' tasks; None = all
    max_length: int = 128
    max_prompt_length: Optional[int] = None  # None = max_length // 2
    prefix_eos: bool = False           # start every sequence after an EOS (models pretrained by llmkit demo)
    identical: str = "drop"            # chosen == rejected: drop (warn) | error
    bad_rows: str = "error"            # a malformed row (empty answer, ...): error | skip (one warning)
    batch_size: int = 8
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("max_length", "batch_size", "synthetic_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name}={getattr(self, name)!r}: expected a positive integer")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction!r}: expected a float in [0, 1)")


@dataclass
class AlignRecipe:
    method: str = "dpo"
    options: dict = field(default_factory=dict)
    reference: str = "copy"
    model: dict = field(default_factory=lambda: {"preset": "llama-tiny"})
    data: AlignData = field(default_factory=AlignData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, max_steps=100))
    peft: Optional[dict] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {list(METHODS)}")
        if self.reference not in ("copy", "precomputed"):
            raise ValueError(f"reference={self.reference!r}: expected 'copy' or 'precomputed'")
        if self.reference == "precomputed" and self.method not in ("dpo", "ipo"):
            raise ValueError(f"reference='precomputed' is for dpo and ipo, not method={self.method!r}")
        if self.peft is not None and "method" not in self.peft:
            raise ValueError(f"peft={self.peft!r}: expected a 'method' key (e.g. lora) plus its options")
        if not isinstance(self.model, dict) or not ({"from", "preset"} & set(self.model)):
            raise ValueError(f"model={self.model!r}: expected 'from: <checkpoint folder>' or 'preset: <name>'")


def parse_align_recipe(data: dict) -> AlignRecipe:
    return build(AlignRecipe, data)


def _rows(data: AlignData) -> list[dict]:
    if data.source == "synthetic":
        tasks = SyntheticTasks(seed=data.seed, **({"tasks": data.synthetic_tasks} if data.synthetic_tasks else {}))
        return tasks.preference_pairs(data.synthetic_examples, style="compact")
    return read_rows(data.source)


def _model_and_tokenizer(recipe: AlignRecipe, texts: list[str]):
    from ..io import load_any
    from ..pretrain import build_model_from_section, check_model_section
    section = recipe.model
    check_model_section(section)
    if "from" in section:
        model, tokenizer = load_any(section["from"]), load_tokenizer(section["from"])
    else:
        tokenizer = train_char(texts=texts, special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
        torch.manual_seed(recipe.train.seed)
        model = build_model_from_section(section, tokenizer)
    if recipe.method == "rm" and not hasattr(model, "value_head"):
        model = reward_model_from(model)
    return model, tokenizer


def save_aligned(model, tokenizer, directory: Path) -> None:
    """Policies: Hugging Face format (or llmkit's) + tokenizer. Reward models (ValueModel, which no HF
    layout holds): every tensor in model.safetensors and the ModelConfig in reward_config.json."""
    from ..pretrain import save_model
    if not hasattr(model, "value_head"):
        save_model(model, tokenizer, directory)
        return
    import dataclasses

    from ..io.safetensors_files import atomic_write_text, write_tensors
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, directory, "2GB")
    atomic_write_text(directory / "reward_config.json",
                      json.dumps({"task": "reward", "config": dataclasses.asdict(model.config)}, indent=2, default=str))
    tokenizer.save(directory)


def run_align(recipe: AlignRecipe) -> dict:
    start = time.time()
    out = Path(recipe.train.out_dir)
    rows = normalize_rows(_rows(recipe.data), bad_rows=recipe.data.bad_rows)
    texts = [r["prompt"] + r.get("chosen", r.get("completion", "")) + r.get("rejected", "") for r in rows]
    model, tokenizer = _model_and_tokenizer(recipe, texts)
    if recipe.method == "kto":
        rows = to_unpaired(rows)
    n_val = int(len(rows) * recipe.data.val_fraction)
    split = torch.randperm(len(rows), generator=torch.Generator().manual_seed(recipe.data.seed)).tolist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    d = recipe.data
    token_args = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, identical=d.identical,
                      prefix_ids=[tokenizer.eos_token_id] if d.prefix_eos else [])
    train_ex = tokenize_rows([rows[i] for i in split[n_val:]], tokenizer, **token_args)
    val_ex = tokenize_rows([rows[i] for i in split[:n_val]], tokenizer, **token_args) if n_val else []

    handle = None
    if recipe.peft is not None:
        from .. import peft
        options = {k: v for k, v in recipe.peft.items() if k != "method"}
        handle = peft.apply(model, recipe.peft["method"], **options)
    reference = None
    if recipe.method in ("dpo", "ipo", "kto"):
        reference = handle if handle is not None else frozen_copy(model)
        if recipe.reference == "precomputed":
            train_ex = precompute_reference_logps(train_ex, model if handle else reference, pad, handle=handle)
            val_ex = precompute_reference_logps(val_ex, model if handle else reference, pad, handle=handle)
            reference = None            # nothing kept: the batches carry the log-probs
    try:
        objective = make_objective(recipe.method, reference, **recipe.options)
    except ValueError as exc:
        raise RecipeError(f"options: {exc}") from exc
    train = PreferenceBatches(train_ex, d.batch_size, pad, seed=d.seed)
    val = PreferenceBatches(val_ex, min(d.batch_size, len(val_ex)), pad, shuffle=False).fixed() if val_ex else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    print(f"align {recipe.method}: {len(train_ex)} train / {len(val_ex)} val examples, "
          f"{model.num_parameters(trainable_only=True) / 1e6:.2f}M trainable parameters")
    result = Trainer(model, objective, train, val_data=val, config=recipe.train).fit()
    if handle is not None and hasattr(handle, "merge_and_unload"):
        model = handle.merge_and_unload()
    save_aligned(model, tokenizer, out / "model")
    summary = {"method": recipe.method, "status": result.status, "step": result.step, "train_loss": result.train_loss,
               "val_loss": result.val_loss, "metrics": {k: v for k, v in result.metrics.items()
                                                         if k.startswith(("rewards/", "logps/", "kl"))},
               "seconds": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done: step {result.step}, train loss {result.train_loss:.4f}; model in {out / 'model'}")
    return summary
