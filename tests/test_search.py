"""Hyperparameter search (llmkit.finetune.search): grid / random / TPE on toy trial functions whose
optimum is known, pruning, failed trials, the results table and best_config.yaml, bad specs."""
from __future__ import annotations

import itertools
import json
import math
import random
import sys

import pytest
import yaml

from llmkit.config import ConfigError
from llmkit.finetune.search import (MedianStopping, ParamSpec, SearchConfig, SearchError, parse_spec,
                                    run_search)

LR_SPACE = {"train.lr": {"low": 1e-6, "high": 1.0, "log": True}}


def quadratic(params, reporter=None):
    """-(log10 lr + 3)^2: best at lr = 1e-3, value 0."""
    return {"val/score": -(math.log10(params["train.lr"]) + 3) ** 2}


def search(trial_fn, tmp_path, **config):
    config = {"method": "random", "trials": 6, "metric": "val/score", "mode": "max", "seed": 0,
              "space": LR_SPACE, **config}
    return run_search(trial_fn, config, tmp_path, progress=False)


# ---- grid ----------------------------------------------------------------------------------------
def test_grid_runs_the_cartesian_product_exactly_once(tmp_path):
    space = {"data.batch_size": [8, 16, 32], "train.lr": {"low": 1e-4, "high": 1e-2, "log": True, "steps": 3}}
    seen = []
    result = search(lambda p, r: seen.append(p) or {"val/score": 0.0}, tmp_path, method="grid", trials=100,
                    space=space)
    expected = [{"data.batch_size": b, "train.lr": lr} for b, lr in itertools.product([8, 16, 32], [1e-4, 1e-3, 1e-2])]
    assert seen == expected                                   # all 9, in order, first key slowest
    assert [t["params"] for t in result.trials] == expected


def test_grid_larger_than_trials_is_truncated_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"6 combinations but search.trials=4.*first 4"):
        result = search(lambda p, r: {"val/score": 1.0}, tmp_path, method="grid", trials=4,
                        space={"a": [1, 2, 3], "b": [0, 1]})
    assert len(result.trials) == 4


def test_int_and_log_grid_points():
    spec = parse_spec("train.max_steps", {"low": 10, "high": 1000, "log": True, "type": "int", "steps": 3}, "grid")
    assert spec.choices == (10, 100, 1000)
    spec = parse_spec("x", {"low": 0, "high": 2, "type": "int", "steps": 5}, "grid")
    assert spec.choices == (0, 1, 2)                          # 0, .5, 1, 1.5, 2 rounded and deduplicated


# ---- random --------------------------------------------------------------------------------------
def test_random_is_reproducible_per_seed_and_within_bounds(tmp_path):
    space = {"train.lr": {"low": 1e-5, "high": 1e-2, "log": True}, "train.weight_decay": {"low": 0.0, "high": 0.1},
             "train.warmup_steps": {"low": 0, "high": 50, "type": "int"}, "data.batch_size": [8, 16]}
    runs = [search(lambda p, r: {"val/score": 0.0}, tmp_path / str(i), trials=8, seed=seed, space=space)
            for i, seed in enumerate([3, 3, 4])]
    params = [[t["params"] for t in run.trials] for run in runs]
    assert params[0] == params[1]
    assert params[0] != params[2]
    for p in params[0] + params[2]:
        assert 1e-5 <= p["train.lr"] <= 1e-2 and 0.0 <= p["train.weight_decay"] <= 0.1
        assert isinstance(p["train.warmup_steps"], int) and 0 <= p["train.warmup_steps"] <= 50
        assert p["data.batch_size"] in (8, 16)


def test_log_ranges_are_sampled_uniformly_in_log_space():
    rng = random.Random(0)
    lr = ParamSpec("lr", low=1e-6, high=1.0, log=True)
    draws = [lr.sample(rng) for _ in range(2000)]
    below = sum(x < 1e-3 for x in draws) / len(draws)
    assert 0.45 < below < 0.55                   # half the decades; a linear draw would give ~0.001
    steps = ParamSpec("steps", low=1, high=1000, log=True, type="int")
    ints = [steps.sample(rng) for _ in range(2000)]
    assert all(isinstance(k, int) and 1 <= k <= 1000 for k in ints)
    assert 0.4 < sum(k < 32 for k in ints) / len(ints) < 0.6     # median near sqrt(1000) ~ 31.6
    linear = ParamSpec("wd", low=0.0, high=1.0)
    assert 0.45 < sum(linear.sample(rng) < 0.5 for _ in range(2000)) / 2000 < 0.55


# ---- choosing the best ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode, best_lr", [("max", 1e-3), ("min", 1e-5)])
def test_best_trial_follows_the_mode(tmp_path, mode, best_lr):
    result = search(quadratic, tmp_path, method="grid", mode=mode, space={"train.lr": [1e-5, 1e-3, 1e-2]})
    assert result.best_params == {"train.lr": best_lr}
    assert result.best_value == quadratic({"train.lr": best_lr})["val/score"]
    assert result.trials[result.best_trial]["params"] == {"train.lr": best_lr}


def test_random_search_finds_the_known_optimum_region(tmp_path):
    result = search(quadratic, tmp_path, trials=30)
    values = [t["value"] for t in result.trials]
    assert result.best_value == max(values)
    assert abs(math.log10(result.best_params["train.lr"]) + 3) < 0.5   # within half a decade of 1e-3


# ---- pruning -------------------------------------------------------------------------------------
def curve_trial(steps_run):
    """Reports the quadratic at steps 1..10 and stops when told to; records how many steps it ran."""
    def trial(params, reporter):
        value = quadratic(params)["val/score"]
        for step in range(1, 11):
            steps_run[params["train.lr"]] = step
            if reporter.report(step, value + 0.01 * step):
                return {"val/score": value + 0.01 * step}
        return {"val/score": value + 0.1}
    return trial


@pytest.mark.parametrize("method", ["grid", "tpe"])
def test_pruning_stops_trials_worse_than_the_median_early(tmp_path, method):
    steps_run = {}
    lrs = [1e-3, 2e-3, 1.1e-3, 1e-1, 1e-6]                   # the last two are far from the optimum
    config = dict(method=method, prune=True, trials=len(lrs), prune_startup_trials=2)
    if method == "grid":
        result = search(curve_trial(steps_run), tmp_path, space={"train.lr": lrs}, **config)
        bad = [t for t in result.trials if t["params"]["train.lr"] in (1e-1, 1e-6)]
    else:
        result = search(curve_trial(steps_run), tmp_path, space=LR_SPACE, seed=1, **{**config, "trials": 12})
        bad = [t for t in result.trials if t["status"] == "pruned"]
    assert bad and all(t["status"] == "pruned" for t in bad)
    for t in bad:
        assert steps_run[t["params"]["train.lr"]] < 10 and len(t["reports"]) < 10    # stopped early
        assert t["value"] == t["reports"][-1][1]
    assert result.trials[result.best_trial]["status"] == "completed"
    if method == "grid":
        assert [t["status"] for t in result.trials[:3]] == ["completed"] * 3
        assert all(len(t["reports"]) == 1 for t in bad)      # pruned at their first report


def test_without_prune_every_trial_runs_to_the_end(tmp_path):
    steps_run = {}
    result = search(curve_trial(steps_run), tmp_path, method="grid", space={"train.lr": [1e-3, 2e-3, 1e-1, 1e-6]})
    assert all(t["status"] == "completed" for t in result.trials)
    assert set(steps_run.values()) == {10}


def test_median_stopping_rule_needs_startup_trials_and_respects_warmup():
    rule = MedianStopping("min", startup_trials=2, warmup_steps=2)
    rule.add_completed([(1, 1.0), (2, 1.0), (3, 1.0)])
    assert not rule.should_prune(3, 5.0)                      # only one completed trial so far
    rule.add_completed([(1, 3.0), (2, 3.0), (3, 3.0)])
    assert rule.should_prune(3, 2.5) and not rule.should_prune(3, 1.5)   # median 2.0
    assert not rule.should_prune(1, 100.0)                    # before warmup_steps
    assert not rule.should_prune(7, 100.0)                    # nobody reported step 7
    assert MedianStopping("max", 1).should_prune(1, 0.0) is False


# ---- failures ------------------------------------------------------------------------------------
def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    def trial(params, reporter):
        if params["train.lr"] == 1e-2:
            raise RuntimeError("training diverged at step 3")
        return quadratic(params)
    result = search(trial, tmp_path, method="grid", space={"train.lr": [1e-2, 1e-4, 1e-3]})
    statuses = [t["status"] for t in result.trials]
    assert statuses == ["failed", "completed", "completed"]
    assert result.trials[0]["error"] == "RuntimeError: training diverged at step 3"
    assert result.best_params == {"train.lr": 1e-3}
    lines = (tmp_path / "search_results.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == statuses
    assert "failed: RuntimeError: training diverged at step 3" in result.table_path.read_text()


def test_a_trial_missing_the_metric_fails_naming_it(tmp_path):
    calls = []
    message = r"all 2 trials failed.*returned metrics \['val/loss'\]: expected search.metric='val/score'"
    with pytest.raises(SearchError, match=message) as info:
        search(lambda p, r: calls.append(1) or {"val/loss": 1.0}, tmp_path, trials=2)
    assert len(calls) == 2                                     # it tried every trial before giving up
    assert isinstance(info.value.__cause__, ValueError)


def test_every_trial_failing_raises_with_the_first_error(tmp_path):
    errors = iter([ValueError("first"), ValueError("second")])
    def trial(params, reporter):
        raise next(errors)
    with pytest.raises(SearchError, match="the first error: ValueError: first") as info:
        search(trial, tmp_path, trials=2)
    assert str(info.value.__cause__) == "first"


# ---- outputs -------------------------------------------------------------------------------------
def test_best_config_is_the_base_config_with_the_best_params(tmp_path):
    base = {"model": {"preset": "gpt2-tiny"}, "train": {"lr": 0.5, "max_steps": 7}}
    space = {"train.lr": [1e-2, 1e-3], "data.batch_size": [4]}
    result = run_search(quadratic, dict(method="grid", trials=4, metric="val/score", mode="max", space=space),
                        tmp_path, base_config=base, progress=False)
    saved = yaml.safe_load(result.best_config_path.read_text())
    assert saved == {"model": {"preset": "gpt2-tiny"}, "train": {"lr": 1e-3, "max_steps": 7},
                     "data": {"batch_size": 4}}
    assert base["train"]["lr"] == 0.5 and "data" not in base  # the caller's dict is untouched
    assert result.best_config_path == tmp_path / "best_config.yaml"


def test_a_space_key_clashing_with_the_base_config_fails_before_any_trial(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match=r"'train.lr': train is a value in the base config"):
        run_search(lambda p, r: calls.append(p) or {"val/score": 0.0},
                   dict(metric="val/score", space={"train.lr": [1e-3]}), tmp_path, base_config={"train": 3},
                   progress=False)
    assert calls == []


def test_markdown_table_has_one_row_per_trial_and_stars_the_best(tmp_path):
    result = search(quadratic, tmp_path, trials=5, space={**LR_SPACE, "data.batch_size": [8, 16]})
    text = result.table_path.read_text()
    header = "| trial | train.lr | data.batch_size | val/score | status | seconds |"
    assert header in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line != header]
    assert len(rows) == 5
    assert [r.split(" | ")[0] for r in rows].count(f"| {result.best_trial} ★") == 1
    assert len((tmp_path / "search_results.jsonl").read_text().splitlines()) == 5


# ---- TPE -----------------------------------------------------------------------------------------
def test_tpe_is_seeded_and_concentrates_near_the_optimum(tmp_path):
    """TPE's later proposals beat random search's on average (its first 10 trials are random)."""
    tpe = [search(quadratic, tmp_path / f"tpe{i}", method="tpe", trials=30, seed=0) for i in range(2)]
    assert [t["params"] for t in tpe[0].trials] == [t["params"] for t in tpe[1].trials]
    rnd = search(quadratic, tmp_path / "random", method="random", trials=30, seed=0)
    late_tpe = sum(t["value"] for t in tpe[0].trials[15:]) / 15
    random_mean = sum(t["value"] for t in rnd.trials) / 30
    assert late_tpe > random_mean + 1.0, (late_tpe, random_mean)
    assert tpe[0].best_value >= -0.1


def test_tpe_without_optuna_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)          # makes `import optuna` raise ImportError
    with pytest.raises(ImportError, match=r"pip install llmkit\[tune\]"):
        search(quadratic, tmp_path, method="tpe")


# ---- configuration errors ------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"trails": 3}, r"search has no field 'trails'; did you mean 'trials'\?"),
    ({"method": "randm"},
     r"search.method='randm': expected one of \['grid', 'random', 'tpe'\] \(did you mean 'random'\?\)"),
    ({"mode": "maximize"}, r"search.mode='maximize': expected 'max' or 'min'"),
    ({"trials": 0}, r"search.trials=0: expected an int >= 1"),
    ({"metric": ""}, r"search.metric='': expected the name of a metric"),
    ({"space": {}}, r"search.space=\{\}: expected a non-empty mapping"),
    ({"space": {"train.lr": []}}, r"search.space.train.lr=\[\]: expected at least one value"),
    ({"space": {"train.lr": 0.1}}, r"search.space.train.lr=0.1: expected a list of values or a range"),
    ({"space": {"train.lr": {"low": 1e-5, "hi": 1e-3}}},
     r"search.space.train.lr has no key 'hi'; did you mean 'high'\?"),
    ({"space": {"train.lr": {"low": 1e-5}}}, r"search.space.train.lr=.*a range needs high"),
    ({"space": {"train.lr": {"low": 1e-2, "high": 1e-3}}},
     r"search.space.train.lr: low=0.01 >= high=0.001; expected low < high"),
    ({"space": {"train.lr": {"low": 0.0, "high": 1e-3, "log": True}}},
     r"search.space.train.lr: log=true needs low > 0, got low=0.0"),
    ({"space": {"train.lr": {"low": "abc", "high": 1e-3}}},
     r"search.space.train.lr.low='abc': expected a finite number"),
    ({"space": {"x": {"low": 0, "high": 1, "type": "double"}}},
     r"search.space.x.type='double': expected 'float' or 'int'"),
    ({"space": {"x": {"low": 0.5, "high": 4, "type": "int"}}},
     r"search.space.x.low=0.5: type int needs whole-number bounds"),
    ({"space": {"x": {"low": 0, "high": 1, "steps": 1}}}, r"search.space.x.steps=1: expected an int >= 2"),
    ({"method": "grid", "space": {"train.lr": {"low": 1e-5, "high": 1e-3, "log": True}}},
     r"search.space.train.lr=.*grid search needs a list of values or a range with a `steps` count"),
])
def test_bad_search_configs_name_the_field_value_and_expectation(change, message):
    with pytest.raises(ConfigError, match=message):
        SearchConfig.from_dict({"metric": "val/score", "space": LR_SPACE, **change})


def test_yaml_string_numbers_are_accepted():
    """YAML 1.1 reads `1e-5` (no dot) as a string; a range accepts it as the number it means."""
    config = SearchConfig.from_dict({"space": {"train.lr": {"low": "1e-5", "high": "1e-3", "log": True}}})
    assert config.params()[0].low == 1e-5
