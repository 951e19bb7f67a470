"""The selective PEFT methods through `llmkit finetune`: the job passes the data-driven methods a
loader of their own and its loss, the merged model saves and evaluates to the same metrics; one
recipe per method on MiniLM SST-2, parsed."""
from __future__ import annotations

import pytest

from llmkit.finetune import EvalRecipe, parse_finetune_recipe, run_eval, run_finetune
from llmkit.recipes import RecipeError, load_yaml
from conftest import REPO
from test_finetune_classification import sentiment_rows, tiny_recipe

BLOCKS = {
    "fishmask": {"density": 0.01, "num_batches": 2},
    "fish_dip": {"density": 0.01, "num_batches": 2, "update_every": 4, "top_examples": 4},
    "child_tuning": {"mode": "F", "density": 0.05, "num_batches": 2},
    "child_tuning_d": {"method": "child_tuning", "mode": "D", "p_d": 0.5},
    "diff_pruning": {"density": 0.01, "prune_at": 8},
    "far": {"density": 0.25},
    "spt": {"density": 0.01, "num_batches": 2, "lora_threshold": 0.05},
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_finetune_with_each_selective_method_merges_saves_and_reloads(name, tmp_path):
    block = {"method": name, **BLOCKS[name]}
    recipe = tiny_recipe(tmp_path, peft={"train_head": True, **block},
                         train={"max_steps": 12, "eval_every": 0, "lr": 1e-2})
    summary = run_finetune(parse_finetune_recipe(recipe), verbose=False)
    assert summary["steps"] == 12
    assert 0 < summary["trainable_parameters"] < summary["parameters"]
    folder = tmp_path / "run" / "model"
    metrics = run_eval(EvalRecipe(model=str(folder), data=sentiment_rows(64, 2), columns={"text": "sentence"},
                                  max_len=32))
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_a_fisher_over_zero_batches_is_a_recipe_error(tmp_path):
    recipe = tiny_recipe(tmp_path, peft={"method": "fishmask", "density": 0.01, "num_batches": 0},
                         train={"max_steps": 2, "eval_every": 0})
    with pytest.raises(RecipeError, match=r"peft: num_batches=0: expected a positive number of batches"):
        run_finetune(parse_finetune_recipe(recipe), verbose=False)


@pytest.mark.parametrize("name", ["bitfit", "pafi", "fishmask", "fish_dip", "child_tuning", "diff_pruning", "far",
                                  "spt"])
def test_each_selective_method_has_a_minilm_sst2_recipe(name):
    recipe = load_yaml(REPO / "recipes" / f"peft_{name}_minilm_sst2.yaml")
    assert recipe["peft"]["method"] == name
    parse_finetune_recipe(recipe)


def reversal_rows(n, seed):
    import random
    rng = random.Random(seed)
    words = ["ab", "cd", "ef", "gh", "ij", "kl"]
    rows = []
    for _ in range(n):
        line = [rng.choice(words) for _ in range(3)]
        rows.append({"prompt": " ".join(line), "response": " ".join(reversed(line))})
    return rows


def seq2seq_recipe(tmp_path, **sections):
    recipe = {
        "model": {"preset": "bart-tiny", "tokenizer": "char", "task": "seq2seq", "d_model": 32, "n_layers": 1,
                  "n_heads": 2, "d_ff": 64, "dropout": 0.0, "attn_dropout": 0.0},
        "data": {"train": reversal_rows(256, 0), "dev": reversal_rows(32, 1), "test": reversal_rows(32, 2),
                 "max_len": 16, "batch_size": 32},
        "train": {"out_dir": str(tmp_path / "run"), "lr": 1e-2, "max_steps": 60, "progress": False,
                  "tensorboard": False, "plot": False, "log_every": 20, "keep_last": 1, "eval_every": 0},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def test_seq2seq_task_learns_word_reversal_and_evaluates_the_same_after_saving(tmp_path):
    summary = run_finetune(parse_finetune_recipe(seq2seq_recipe(tmp_path)), verbose=False)
    assert summary["test"]["loss"] < 1.0 and summary["test"]["token_accuracy"] > 0.7
    metrics = run_eval(EvalRecipe(model=str(tmp_path / "run" / "model"), data=reversal_rows(32, 2), max_len=16))
    assert metrics["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)
    assert metrics["exact_match"] == pytest.approx(summary["test"]["exact_match"])


def test_xattn_trains_only_bart_cross_attention_through_the_job(tmp_path):
    import torch
    from llmkit.finetune.tasks import load_task
    first = run_finetune(parse_finetune_recipe(seq2seq_recipe(tmp_path / "a", train={"max_steps": 30})),
                         verbose=False)
    base = tmp_path / "a" / "run" / "model"
    recipe = seq2seq_recipe(tmp_path / "b", peft={"method": "xattn"}, train={"max_steps": 30})
    recipe["model"] = {"from": str(base), "task": "seq2seq"}
    summary = run_finetune(parse_finetune_recipe(recipe), verbose=False)
    _, before, _ = load_task(base)
    _, after, _ = load_task(tmp_path / "b" / "run" / "model")
    changed = [n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert changed and all(".cross_attn." in n for n in changed), changed
    assert summary["trainable_parameters"] == sum(p.numel() for n, p in before.named_parameters()
                                                  if ".cross_attn." in n and "norm" not in n)
    assert first["steps"] == summary["steps"] == 30


def test_xattn_has_a_bart_seq2seq_recipe():
    recipe = load_yaml(REPO / "recipes" / "peft_xattn_bart_seq2seq.yaml")
    assert recipe["peft"]["method"] == "xattn" and recipe["model"]["task"] == "seq2seq"
    parse_finetune_recipe(recipe)


@pytest.mark.slow
def test_fishmask_recipe_on_minilm_sst2_reaches_80_percent(tmp_path):
    """FishMask on the pretrained MiniLM: 0.5% of the Linear weight entries (by the empirical Fisher
    over 256 training examples) + the head, recipes/peft_fishmask_minilm_sst2.yaml as
    benchmarks/results/peft_selective.md ran it (4,000 rows, 125 steps of 32, dev every 25, best
    kept; lr 3e-3). Seen there: 81.65% dev accuracy (full fine-tuning 83.03%)."""
    from conftest import minilm_sst2_recipe
    summary = run_finetune(parse_finetune_recipe(minilm_sst2_recipe("peft_fishmask_minilm_sst2", tmp_path)), verbose=False)
    assert summary["dev"]["examples"] == 872 and summary["trainable_parameters"] == 53_854
    assert summary["dev"]["accuracy"] >= 0.80
