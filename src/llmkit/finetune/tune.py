"""`llmkit tune recipe.yaml`: hyperparameter search over a fine-tuning recipe's `search:` block.

Each trial is `run_finetune` on the recipe with the trial's values set at dotted keys
(`train.lr`, `data.batch_size`, `epochs`, `train.weight_decay`, `train.warmup_steps`, ...), in its
own folder <train.out_dir>/trials/<n>; its dev evaluations are reported to the search, which may
prune it (stop it early). The search itself (grid, random, Optuna TPE with pruning) lives in
`llmkit.finetune.search`; it writes search_results.md (the table) and best_config.yaml (the
recipe with the best values, ready for `llmkit finetune`) into <train.out_dir>/search.
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..recipes import RecipeError
from .recipe import parse_finetune_recipe
from .pipeline import run_finetune, trial_metrics


def run_tune(data: dict, *, verbose: bool = False):
    """Run the search a recipe mapping describes; returns llmkit.finetune.search.SearchResult."""
    from .search import SearchConfig, run_search
    recipe = parse_finetune_recipe(data)          # the base recipe must be valid before any trial
    if recipe.search is None:
        raise RecipeError("tune: the recipe has no `search:` block (method, trials, metric, mode, space)")
    config = SearchConfig.from_dict(recipe.search)
    out = Path(recipe.train.out_dir)
    base = copy.deepcopy(data)
    base.pop("search", None)
    counter = {"n": 0}

    def trial(params: dict, reporter) -> dict:
        index = counter["n"]
        counter["n"] += 1
        trial_data = copy.deepcopy(base)
        for key, value in params.items():
            node = trial_data
            *sections, last = key.split(".")
            for section in sections:
                node = node.setdefault(section, {})
            node[last] = value
        trial_data.setdefault("train", {})
        trial_data["train"] = {**trial_data["train"], "out_dir": str(out / "trials" / str(index)),
                               "tensorboard": False, "plot": False, "keep_last": 1}
        trial_data["save"] = "none"
        summary = run_finetune(parse_finetune_recipe(trial_data), reporter=reporter, verbose=verbose)
        return trial_metrics(summary)

    return run_search(trial, config, out / "search", base_config=base)
