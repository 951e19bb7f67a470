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
