"""`llmkit align recipe.yaml method=cai`: Constitutional AI end to end (Bai et al. 2022; see cai.py).

    options:
      prompts: 64                 # the first N dialogues' first Human turn (HH-RLHF layout in data.source)
      rounds: 1                   # SL-CAI critique -> revision rounds
      max_new_tokens: 48
      constitution: null          # a .yaml / .json file; null = the packaged one (align/constitution.yaml)
      sft_steps: 60               # SL-CAI: SFT on the final revisions
      principles_per_pair: 4      # RL-CAI: the feedback model's principle ensemble per pair
      rm_steps: 30                # the preference model on the soft labels
      ppo: null                   # PPOConfig fields: RL-CAI's PPO on the preference model; null = stop there
    model:   from: the helpful model to start from | preset + fields (a fresh model: a smoke run)
    feedback: null                # a causal-LM folder as the feedback model; null = a frozen copy of the SL-CAI model

Stages:
1. SL-CAI: answer, critique and revise each prompt under sampled principles; SFT on the revisions.
2. RL-CAI labels: two sampled responses of the SL-CAI model per prompt, labelled by the feedback
   model with an ensemble of the constitution's preference questions (both orders): soft labels.
3. A preference model (the SL-CAI model's stack + a scalar head) on them, cross-entropy on the
   soft labels.
4. With `ppo`: PPO of the SL-CAI model against that preference model (`ppo.py`).
Leaves in train.out_dir: sl_cai_rows.jsonl, sl_cai/model, rl_cai_labels.jsonl, rm/model,
rl_cai/model (with ppo), each stage's run files, summary.json.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..jobs.artifacts import load_artifacts, save_artifacts
from ..model import build_model
from ..recipes import RecipeError, to_yaml
from ..tokenizer import train_char
from ..train import Trainer
from .cai import CRITIQUE, HUMAN, PREFERENCE, REVISION, critique_and_revise, dialogue, harmlessness_labels, sl_cai_sft
from .constitution import load_constitution
from .data import PreferenceBatches, first_human_turn, normalize_rows, read_rows, tokenize_rows
from .objectives import RewardObjective, frozen_copy, reward_model_from
from .on_policy import complete
from .ppo import PPOConfig, PPOTrainer

DEFAULTS = {"prompts": 64, "rounds": 1, "max_new_tokens": 48, "constitution": None, "sft_steps": 60,
            "principles_per_pair": 4, "rm_steps": 30, "ppo": None}


def cai_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise RecipeError(f"options: unknown key(s) {unknown} for method=cai: expected {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    for name in ("prompts", "rounds", "max_new_tokens", "sft_steps", "principles_per_pair", "rm_steps"):
        value = merged[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "rm_steps" else 1):
            raise RecipeError(f"options.{name}={value!r}: expected a positive integer")
    if merged["ppo"] is not None and not isinstance(merged["ppo"], dict):
        raise RecipeError(f"options.ppo={merged['ppo']!r}: expected null or a mapping of PPOConfig fields")
    return merged


def _model(recipe, texts: list[str]):
    section = recipe.model
    if section.checkpoint is not None:
        saved = load_artifacts(section.checkpoint)
        return saved.model, saved.tokenizer
    tokenizer = train_char(texts=texts, special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    torch.manual_seed(recipe.train.seed)
    return build_model(section.config(tokenizer), "causal_lm"), tokenizer


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_cai(recipe) -> dict:
    start = time.time()
    opts = cai_options(recipe.options)
    out = Path(recipe.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    if recipe.data.source == "synthetic":
        raise RecipeError("method=cai: data.source must be dialogues in the HH-RLHF layout (a .jsonl(.gz) with "
                          "'chosen'), e.g. ../shared/data/hh_rlhf_harmless_test.jsonl.gz")
    rows = read_rows(recipe.data.source)[:opts["prompts"]]
    prompts = [first_human_turn(r["chosen"] if "chosen" in r else r.get("prompt", ""), f"{recipe.data.source} row {i}")
               for i, r in enumerate(rows)]
    constitution = load_constitution(opts["constitution"])
    texts = prompts + [HUMAN, CRITIQUE, REVISION, PREFERENCE, "AB"] + [
        p.critique + p.revision + p.preference for p in constitution.principles]
    model, tok = _model(recipe, texts)
    gen = dict(max_new_tokens=opts["max_new_tokens"])
    stage = lambda name, steps: replace(recipe.train, out_dir=str(out / name), max_steps=steps)  # noqa: E731

    # 1. SL-CAI
    sl_rows = critique_and_revise(model, tok, prompts, constitution, rounds=opts["rounds"], seed=recipe.data.seed,
                                  **gen)
    _jsonl(out / "sl_cai_rows.jsonl", sl_rows)
    sft = sl_cai_sft(model, tok, sl_rows, config=stage("sl_cai", opts["sft_steps"]), val_rows=sl_rows)
    save_artifacts(out / "sl_cai" / "model", model, tok, job="align", task="causal_lm")
    summary = {"method": "cai", "prompts": len(prompts), "rounds": opts["rounds"],
               "revised": sum(r["revision"] != r["response"] for r in sl_rows), "sl_cai_sft_loss": sft.val_loss}
    print(f"SL-CAI: {len(sl_rows)} prompts, {summary['revised']} revised; SFT loss on the revisions "
          f"{sft.val_loss:.3f}")

    # 2. RL-CAI labels on two sampled responses of the SL-CAI model
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(recipe.data.seed)
    asks = [dialogue(p) for p in prompts]
    a, b = (complete(model, tok, asks, do_sample=True, generator=generator, **gen) for _ in range(2))
    pairs = [{"prompt": p, "a": x.strip(), "b": y.strip()} for p, x, y in zip(prompts, a, b)
             if x.strip() and y.strip() and x.strip() != y.strip()]
    summary["pairs"], summary["pairs_dropped"] = len(pairs), len(prompts) - len(pairs)
    if not pairs:
        raise RecipeError("RL-CAI: every prompt's two sampled responses were empty or identical: nothing to label "
                          "(more prompts, or a model that answers)")
    feedback = load_artifacts(recipe.feedback).model if recipe.feedback else frozen_copy(model)
    labels = (" A", " B") if len(tok.encode(" A", add_special_tokens=False)) == 1 else ("A", "B")
    labelled = harmlessness_labels(feedback, tok, pairs, constitution, principles_per_pair=opts["principles_per_pair"],
                                   seed=recipe.data.seed, labels=labels)
    _jsonl(out / "rl_cai_labels.jsonl", labelled)
    summary["mean_label"] = sum(r["label"] for r in labelled) / len(labelled)

    # 3. the preference model on the soft labels
    hh = [{"prompt": dialogue(r["prompt"]), "chosen": " " + r["chosen"], "rejected": " " + r["rejected"],
           "label": r["label"]} for r in labelled]
    examples = tokenize_rows(normalize_rows(hh), tok, max_length=recipe.data.max_length)
    rm = reward_model_from(copy.deepcopy(model))
    if opts["rm_steps"]:
        result = Trainer(rm, RewardObjective().loss, PreferenceBatches(examples, min(recipe.data.batch_size,
                         len(examples)), tok.pad_id, seed=recipe.data.seed), config=stage("rm", opts["rm_steps"])).fit()
        summary["rm_loss"] = result.train_loss
    save_artifacts(out / "rm" / "model", rm, tok, job="align", task="reward")
    print(f"RL-CAI: {len(labelled)} labelled pairs (mean label {summary['mean_label']:.3f}); preference model in "
          f"{out / 'rm' / 'model'}")

    # 4. PPO against the preference model
    if opts["ppo"] is not None:
        try:
            config = PPOConfig(**opts["ppo"])
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"options.ppo: {exc}") from exc
        steps = config.iterations * config.steps_per_rollout
        ppo = PPOTrainer(model, tok, asks, rm, config=config, train=stage("rl_cai", steps)).fit()
        save_artifacts(out / "rl_cai" / "model", model, tok, job="align", task="causal_lm")
        summary["ppo"] = {k: float(v) for k, v in ppo.metrics.items() if k.startswith(("objective/", "loss/"))}
    summary["seconds"] = round(time.time() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {summary['seconds']} s; models in {out}")
    return summary
