"""`llmkit align recipe.yaml [key=value ...]`: reward modelling, DPO, IPO, KTO, ORPO or PPO from a recipe.

    method:    rm | dpo | ipo | kto | orpo | ppo (keys reward, track: ppo_recipe.py) | cai (Constitutional
               AI, SL-CAI -> preference model -> PPO; key feedback: cai_recipe.py)
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
from ..jobs.artifacts import load_artifacts, save_artifacts
from ..jobs.model_section import ModelSection, rename_from
from ..jobs.peft_block import apply_peft_block, check_peft_block
from ..jobs.tokenizers import setup_tokenizer
from ..model import build_model
from ..recipes import RecipeError, build, to_yaml
from ..train import TrainConfig, Trainer
from .data import PreferenceBatches, normalize_rows, read_rows, to_unpaired, tokenize_rows
from .objectives import ALIGN_METHODS, frozen_copy, make_alignment_objective, precompute_reference_logps, reward_model_from


ONLINE_METHODS = ("ppo", "cai")      # their own jobs: ppo_recipe.py, cai_recipe.py


@dataclass
class AlignData:
    source: Any = "synthetic"          # "synthetic" (SyntheticTasks.preference_pairs), "toy_reviews" (ppo) or a file
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
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="llama-tiny"))
    data: AlignData = field(default_factory=AlignData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, max_steps=100))
    peft: Optional[dict] = None
    reward: Optional[dict] = None      # ppo: {from: reward model} | {text: toy_reviews} | {judge: causal LM}
    track: Optional[list] = None       # ppo: text rewards logged as objective/<name>
    feedback: Optional[str] = None     # cai: the feedback model's folder (None: a frozen copy of the SL-CAI model)

    def __post_init__(self):
        if self.method not in (*ALIGN_METHODS, *ONLINE_METHODS):
            raise ValueError(f"method={self.method!r}: expected one of {[*ALIGN_METHODS, *ONLINE_METHODS]}")
        if self.method != "ppo" and (self.reward is not None or self.track is not None):
            raise ValueError(f"reward / track are keys of method=ppo, not method={self.method!r}")
        if self.method != "cai" and self.feedback is not None:
            raise ValueError(f"feedback is a key of method=cai, not method={self.method!r}")
        if self.reference not in ("copy", "precomputed"):
            raise ValueError(f"reference={self.reference!r}: expected 'copy' or 'precomputed'")
        if self.reference == "precomputed" and self.method not in ("dpo", "ipo"):
            raise ValueError(f"reference='precomputed' is for dpo and ipo, not method={self.method!r}")
        check_peft_block(self.peft)


def parse_align_recipe(data: dict) -> AlignRecipe:
    return build(AlignRecipe, rename_from(data))


def _rows(data: AlignData) -> list[dict]:
    if data.source == "synthetic":
        tasks = SyntheticTasks(seed=data.seed, **({"tasks": data.synthetic_tasks} if data.synthetic_tasks else {}))
        return tasks.preference_pairs(data.synthetic_examples, style="compact")
    return read_rows(data.source)


def _model_and_tokenizer(recipe: AlignRecipe, texts: list[str]):
    section = recipe.model
    if section.checkpoint is not None:
        saved = load_artifacts(section.checkpoint)
        model, tokenizer = saved.model, saved.tokenizer
    else:
        tokenizer = setup_tokenizer("char", lambda: texts)
        torch.manual_seed(recipe.train.seed)
        model = build_model(section.config(tokenizer), "causal_lm")
    if recipe.method == "rm" and not hasattr(model, "value_head"):
        model = reward_model_from(model)
    return model, tokenizer


def run_align(recipe: AlignRecipe) -> dict:
    if recipe.method == "ppo":
        from .ppo_recipe import run_ppo
        return run_ppo(recipe)
    if recipe.method == "cai":
        from .cai_recipe import run_cai
        return run_cai(recipe)
    start = time.time()
    out = Path(recipe.train.out_dir)
    rows = normalize_rows(_rows(recipe.data), bad_rows=recipe.data.bad_rows)
    texts = [r["prompt"] + r.get("chosen", r.get("completion", "")) + r.get("rejected", "") for r in rows]
    model, tokenizer = _model_and_tokenizer(recipe, texts)
    if recipe.method == "kto":
        rows = to_unpaired(rows)
    n_val = int(len(rows) * recipe.data.val_fraction)
    split = torch.randperm(len(rows), generator=torch.Generator().manual_seed(recipe.data.seed)).tolist()
    pad = tokenizer.pad_id
    d = recipe.data
    token_args = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, identical=d.identical,
                      prefix_ids=[tokenizer.eos_token_id] if d.prefix_eos else [])
    train_ex = tokenize_rows([rows[i] for i in split[n_val:]], tokenizer, **token_args)
    val_ex = tokenize_rows([rows[i] for i in split[:n_val]], tokenizer, **token_args) if n_val else []

    handle = apply_peft_block(model, recipe.peft, tokenizer)
    reference = None
    if recipe.method in ("dpo", "ipo", "kto"):
        reference = handle if handle is not None else frozen_copy(model)
        if recipe.reference == "precomputed":
            train_ex = precompute_reference_logps(train_ex, model if handle else reference, pad, handle=handle)
            val_ex = precompute_reference_logps(val_ex, model if handle else reference, pad, handle=handle)
            reference = None            # nothing kept: the batches carry the log-probs
    try:
        objective = make_alignment_objective(recipe.method, reference, **recipe.options)
    except ValueError as exc:
        raise RecipeError(f"options: {exc}") from exc
    train = PreferenceBatches(train_ex, d.batch_size, pad, seed=d.seed)
    val = PreferenceBatches(val_ex, min(d.batch_size, len(val_ex)), pad, shuffle=False).fixed() if val_ex else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    print(f"align {recipe.method}: {len(train_ex)} train / {len(val_ex)} val examples, "
          f"{model.num_parameters(trainable_only=True) / 1e6:.2f}M trainable parameters")
    loss_fn, callbacks = (handle.wrap_loss(objective.loss), handle.callbacks()) if handle else (objective.loss, [])
    result = Trainer(model, loss_fn, train, val_data=val, config=recipe.train, callbacks=callbacks).fit()
    save_artifacts(out / "model", model, tokenizer, job="align", handle=handle,
                   task="reward" if recipe.method == "rm" else "causal_lm")
    summary = {"method": recipe.method, "status": result.status, "step": result.step, "train_loss": result.train_loss,
               "val_loss": result.val_loss, "metrics": {k: v for k, v in result.metrics.items()
                                                         if k.startswith(("rewards/", "logps/", "kl"))},
               "seconds": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done: step {result.step}, train loss {result.train_loss:.4f}; model in {out / 'model'}")
    return summary
