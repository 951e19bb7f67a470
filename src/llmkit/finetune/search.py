"""Hyperparameter search over dotted recipe keys: grid, random or TPE, with optional pruning.

    search:
      method: random              # grid | random | tpe
      trials: 8
      metric: val/accuracy        # a key of the metrics dict each trial returns
      mode: max                   # max | min
      seed: 0
      prune: false
      space:
        train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}
        train.weight_decay: {low: 0.0, high: 0.1}
        train.max_steps: {low: 100, high: 400, type: int}
        data.batch_size: [16, 32]

A spec is a list (categorical: one of these values) or a range {low, high, log: false, type: float|int,
steps}. A range with `steps` is discrete: its `steps` points spaced evenly from low to high (evenly in
log space when log), which is what a grid needs; random and TPE then choose among those points.

Methods
- grid: every combination of the values (the cartesian product, first key varying slowest);
  `trials` caps it (with a warning naming the grid size).
- random (Bergstra & Bengio 2012, "Random Search for Hyper-Parameter Optimization", JMLR 13): each
  parameter is drawn independently, x ~ U(low, high), or log x ~ U(log low, log high) when log; an int
  range draws k uniformly from {low..high}, or with log P(k) ∝ log((k+1)/k) (floor of a log-uniform
  draw on [low, high+1)). Seeded by `seed`: the same seed gives the same trials.
- tpe (Bergstra, Bardenet, Bengio & Kégl 2011, "Algorithms for Hyper-Parameter Optimization",
  NeurIPS): Optuna's TPESampler (seeded). It splits past trials at a quantile γ of the metric into
  good and bad, fits Parzen densities l(x) = p(x | good) and g(x) = p(x | bad), and proposes the x
  maximising l(x) / g(x), which maximises expected improvement. Its first max(2, min(10, trials // 3))
  trials are random (Optuna's default of 10 would make a short CPU search purely random).
  Needs `pip install llmkit[tune]`.

Pruning (prune: true). A trial calls `reporter.report(step, value)` with an intermediate value of
the metric; it returns True when the trial should stop, and the trial is recorded as "pruned". The
rule is the median stopping rule (Golovin et al. 2017, "Google Vizier: A Service for Black-Box
Optimization", KDD) in the simplified form Optuna's MedianPruner uses: stop when the value at step s
is worse than the median of the values that earlier *completed* trials reported at step s, once at
least `prune_startup_trials` of them reported there and s >= `prune_warmup_steps`. Grid and random
search use the small implementation here (`MedianStopping`); tpe uses Optuna's MedianPruner with the
same two settings. The best trial is chosen among completed trials (pruned ones only if none completed).

Outputs in out_dir: search_results.jsonl (one line per trial, appended and flushed as each trial
ends, so a crash loses nothing; a new search starts the file afresh), search_results.md (the table,
rewritten after every trial) and best_config.yaml (base_config with the best params applied at their
dotted keys).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import math
import os
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tqdm import tqdm

from ..config import ConfigError
from ..io.safetensors_files import atomic_write_text
from ..recipes import to_yaml
from ..train.logging import ProgressBar

__all__ = ["SearchConfig", "ParamSpec", "Reporter", "MedianStopping", "SearchResult", "SearchError",
           "run_search"]

SEARCH_METHODS = ("grid", "random", "tpe")
MODES = ("max", "min")
SPEC_KEYS = ("low", "high", "log", "type", "steps")
TRIAL_STATUSES = ("completed", "pruned", "failed")


class SearchError(RuntimeError):
    """Every trial of a search failed; chained from the first trial's error."""


# ---- the search space --------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: categorical `choices`, or a continuous range [low, high]."""
    name: str
    choices: Optional[tuple] = None
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    type: str = "float"

    def sample(self, rng: random.Random) -> Any:
        if self.choices is not None:
            return rng.choice(self.choices)
        if self.type == "int":
            low, high = int(self.low), int(self.high)
            if self.log:  # floor of a log-uniform draw on [low, high + 1): P(k) ∝ log((k + 1) / k)
                return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))
            return rng.randint(low, high)
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


def _number(where: str, value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}={value!r}: expected a finite number")
    return value


def _points(low: float, high: float, log: bool, kind: str, steps: int) -> tuple:
    """`steps` evenly spaced points from low to high (in log space when log), ints rounded and deduplicated."""
    a, b = (math.log(low), math.log(high)) if log else (low, high)
    raw = [a + (b - a) * i / (steps - 1) for i in range(steps)]
    values = [math.exp(v) if log else v for v in raw]
    if kind == "int":
        return tuple(dict.fromkeys(int(round(v)) for v in values))
    return tuple(float(f"{v:.12g}") for v in values)  # 1e-4, not 9.999999999999999e-05


def parse_spec(name: Any, spec: Any, method: str) -> ParamSpec:
    where = f"search.space.{name}"
    if not isinstance(name, str) or not name:
        raise ConfigError(f"search.space key {name!r}: expected a dotted recipe key such as 'train.lr'")
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{where}=[]: expected at least one value to choose from")
        return ParamSpec(name, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}={spec!r}: expected a list of values or a range such as "
                          "{low: 1.0e-5, high: 1.0e-3, log: true}")
    for key in spec:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {list(SPEC_KEYS)}"
            raise ConfigError(f"{where} has no key {key!r}{hint}")
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise ConfigError(f"{where}={spec!r}: a range needs {' and '.join(missing)}")
    kind, log, steps = spec.get("type", "float"), spec.get("log", False), spec.get("steps")
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}.type={kind!r}: expected 'float' or 'int'")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log={log!r}: expected true or false")
    low, high = _number(f"{where}.low", spec["low"]), _number(f"{where}.high", spec["high"])
    if kind == "int":
        for bound, value in (("low", low), ("high", high)):
            if value != int(value):
                raise ConfigError(f"{where}.{bound}={value!r}: type int needs whole-number bounds")
        low, high = int(low), int(high)
    if not low < high:
        raise ConfigError(f"{where}: low={low!r} >= high={high!r}; expected low < high "
                          "(for a single value use a list: [value])")
    if log and low <= 0:
        raise ConfigError(f"{where}: log=true needs low > 0, got low={low!r}")
    if steps is None:
        if method == "grid":
            raise ConfigError(f"{where}={spec!r}: grid search needs a list of values or a range with a "
                              "`steps` count, e.g. {low: 1.0e-5, high: 1.0e-3, log: true, steps: 3}")
        return ParamSpec(name, low=low, high=high, log=log, type=kind)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"{where}.steps={steps!r}: expected an int >= 2 (points from low to high)")
    return ParamSpec(name, choices=_points(low, high, log, kind, steps))


@dataclass
class SearchConfig:
    """The `search:` block of a recipe (see the module docstring); validated on construction."""
    method: str = "random"
    trials: int = 8
    metric: str = "val/loss"
    mode: str = "min"
    seed: int = 0
    space: dict = field(default_factory=dict)
    prune: bool = False
    prune_startup_trials: int = 2     # completed trials that must have reported a step before pruning there
    prune_warmup_steps: int = 0       # never prune before this step

    def __post_init__(self) -> None:
        if self.method not in SEARCH_METHODS:
            close = difflib.get_close_matches(str(self.method), SEARCH_METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"search.method={self.method!r}: expected one of {list(SEARCH_METHODS)}{hint}")
        if self.mode not in MODES:
            raise ConfigError(f"search.mode={self.mode!r}: expected 'max' or 'min'")
        for name, minimum in (("trials", 1), ("seed", 0), ("prune_startup_trials", 1), ("prune_warmup_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"search.{name}={value!r}: expected an int >= {minimum}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"search.metric={self.metric!r}: expected the name of a metric the trials "
                              "return, e.g. 'val/accuracy'")
        if not isinstance(self.prune, bool):
            raise ConfigError(f"search.prune={self.prune!r}: expected true or false")
        self.params()  # validates the space

    def params(self) -> list[ParamSpec]:
        """The parsed search space, in the order written."""
        if not isinstance(self.space, dict) or not self.space:
            raise ConfigError(f"search.space={self.space!r}: expected a non-empty mapping of dotted recipe "
                              "keys to specs, e.g. {train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}}")
        return [parse_spec(name, spec, self.method) for name, spec in self.space.items()]

    @classmethod
    def from_dict(cls, data: Any) -> "SearchConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"search={data!r}: expected a mapping with method, trials, metric, mode, space")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {known}"
                raise ConfigError(f"search has no field {key!r}{hint}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- pruning -----------------------------------------------------------------------------------
class MedianStopping:
    """Median stopping (Golovin et al. 2017), same-step form: prune a trial at step s when its value is
    worse than the median of the step-s values of completed trials (at least `startup_trials` of them)."""

    def __init__(self, mode: str, startup_trials: int = 2, warmup_steps: int = 0):
        self.mode, self.startup_trials, self.warmup_steps = mode, startup_trials, warmup_steps
        self.completed: list[dict[int, float]] = []   # per completed trial: step -> reported value

    def should_prune(self, step: int, value: float) -> bool:
        if step < self.warmup_steps:
            return False
        earlier = [history[step] for history in self.completed if step in history]
        if len(earlier) < self.startup_trials:
            return False
        median = statistics.median(earlier)
        return value < median if self.mode == "max" else value > median

    def add_completed(self, reports: list[tuple[int, float]]) -> None:
        self.completed.append(dict(reports))


class Reporter:
    """Handed to each trial: `report(step, value) -> bool`, True once the trial should stop early."""

    def __init__(self, should_prune: Callable[[int, float], bool]):
        self._should_prune = should_prune
        self.reports: list[tuple[int, float]] = []
        self.pruned = False

    def report(self, step: int, value: float) -> bool:
        step, value = int(step), float(value)
        self.reports.append((step, value))
        if not self.pruned and self._should_prune(step, value):
            self.pruned = True
        return self.pruned


# ---- proposers: which params each trial runs ---------------------------------------------------
class _Grid:
    def __init__(self, config: SearchConfig, specs: list[ParamSpec]):
        combos = list(itertools.product(*(s.choices for s in specs)))
        if len(combos) > config.trials:
            warnings.warn(f"grid search: the grid has {len(combos)} combinations but search.trials="
                          f"{config.trials}; running the first {config.trials} (set search.trials="
                          f"{len(combos)} to cover the grid)", UserWarning, stacklevel=3)
        self.combos = [dict(zip((s.name for s in specs), c)) for c in combos[:config.trials]]
        self.n_trials = len(self.combos)
        self.pruner = MedianStopping(config.mode, config.prune_startup_trials, config.prune_warmup_steps)
        self.prune = config.prune

    def ask(self, index: int) -> dict:
        return dict(self.combos[index])

    def should_prune(self, step: int, value: float) -> bool:
        return self.prune and self.pruner.should_prune(step, value)

    def tell(self, record: dict) -> None:
        if record["status"] == "completed":
            self.pruner.add_completed(record["reports"])


class _Random(_Grid):
    def __init__(self, config: SearchConfig, specs: list[ParamSpec]):
        self.specs, self.rng, self.n_trials = specs, random.Random(config.seed), config.trials
        self.pruner = MedianStopping(config.mode, config.prune_startup_trials, config.prune_warmup_steps)
        self.prune = config.prune

    def ask(self, index: int) -> dict:
        return {s.name: s.sample(self.rng) for s in self.specs}


def _import_optuna():
    try:
        import optuna
    except ImportError as exc:
        raise ImportError("search.method=tpe needs Optuna: pip install llmkit[tune] "
                          "(or use method: random / grid, which need nothing)") from exc
    return optuna


class _TPE:
    """Optuna's ask/tell interface: our loop runs the trials, Optuna only proposes and prunes."""

    def __init__(self, config: SearchConfig, specs: list[ParamSpec]):
        optuna = self.optuna = _import_optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=config.seed,
                                             n_startup_trials=max(2, min(10, config.trials // 3)))
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=config.prune_startup_trials,
                                              n_warmup_steps=config.prune_warmup_steps)
                  if config.prune else optuna.pruners.NopPruner())
        self.study = optuna.create_study(direction="maximize" if config.mode == "max" else "minimize",
                                         sampler=sampler, pruner=pruner)
        self.specs, self.n_trials, self.trial = specs, config.trials, None

    def ask(self, index: int) -> dict:
        self.trial = self.study.ask()
        return {s.name: self._suggest(s) for s in self.specs}

    def _suggest(self, s: ParamSpec) -> Any:
        if s.choices is not None:
            if all(c is None or isinstance(c, (bool, int, float, str)) for c in s.choices):
                return self.trial.suggest_categorical(s.name, list(s.choices))
            # Optuna stores only plain values: choose an index for lists / mappings.
            return s.choices[self.trial.suggest_categorical(s.name, list(range(len(s.choices))))]
        if s.type == "int":
            return self.trial.suggest_int(s.name, int(s.low), int(s.high), log=s.log)
        return self.trial.suggest_float(s.name, s.low, s.high, log=s.log)

    def should_prune(self, step: int, value: float) -> bool:
        self.trial.report(value, step)
        return self.trial.should_prune()

    def tell(self, record: dict) -> None:
        state = self.optuna.trial.TrialState
        if record["status"] == "completed":
            self.study.tell(self.trial, record["value"])
        else:
            self.study.tell(self.trial, state=state.PRUNED if record["status"] == "pruned" else state.FAIL)


PROPOSERS = {"grid": _Grid, "random": _Random, "tpe": _TPE}


# ---- running -----------------------------------------------------------------------------------
@dataclass
class SearchResult:
    best_params: dict
    best_value: float
    best_trial: int                    # index into trials
    trials: list[dict]                 # {index, params, metrics, value, status, seconds, reports[, error]}
    table_path: Path                   # search_results.md
    best_config_path: Path             # best_config.yaml
    jsonl_path: Path                   # search_results.jsonl
    metric: str = "val/loss"
    mode: str = "min"


TrialFn = Callable[[dict, Reporter], dict]


def run_search(trial_fn: TrialFn, config: Union[SearchConfig, dict], out_dir: Union[str, Path],
               base_config: Optional[dict] = None, *, progress: bool = True) -> SearchResult:
    """Run `config.trials` trials of `trial_fn(params, reporter) -> metrics` and keep the best.

    params: {dotted key: value}; metrics must hold `config.metric`. A trial that raises is recorded as
    failed and the search goes on; if every trial fails, SearchError (chained from the first error)."""
    config = config if isinstance(config, SearchConfig) else SearchConfig.from_dict(config)
    specs = config.params()
    _with_params(base_config, {s.name: None for s in specs})   # a key clash fails now, not after the trials
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proposer = PROPOSERS[config.method](config, specs)
    n = proposer.n_trials
    jsonl_path, table_path = out_dir / "search_results.jsonl", out_dir / "search_results.md"
    trials: list[dict] = []
    first_error: Optional[BaseException] = None
    bar = ProgressBar(n, desc=f"search ({config.method})", enabled=progress)
    try:
        with open(jsonl_path, "w", encoding="utf-8") as log:
            for index in range(n):
                record, error = _run_trial(trial_fn, index, proposer, config)
                first_error = first_error or error
                proposer.tell(record)
                trials.append(record)
                log.write(json.dumps(_jsonable(record), default=str) + "\n")
                log.flush()
                os.fsync(log.fileno())
                best = _best(trials, config.mode)
                atomic_write_text(table_path, format_table(trials, config, specs, best))
                if progress:
                    tqdm.write(_trial_line(record, n, config))
                bar.update(index + 1, **({"best": trials[best]["value"]} if best is not None else {}))
    finally:
        bar.close()
    best = _best(trials, config.mode)
    if best is None:
        raise SearchError(f"all {n} trials failed; the first error: {trials[0]['error']}") from first_error
    chosen = trials[best]
    best_config_path = out_dir / "best_config.yaml"
    header = (f"# best of {n} {config.method} search trials: trial {chosen['index']}, "
              f"{config.metric}={chosen['value']:.6g} ({chosen['status']})\n")
    atomic_write_text(best_config_path, header + to_yaml(_with_params(base_config, chosen["params"])))
    return SearchResult(dict(chosen["params"]), chosen["value"], best, trials, table_path, best_config_path,
                        jsonl_path, config.metric, config.mode)


def _run_trial(trial_fn: TrialFn, index: int, proposer: Any, config: SearchConfig) -> tuple[dict, Optional[Exception]]:
    params = proposer.ask(index)
    reporter = Reporter(proposer.should_prune)
    record = {"index": index, "params": params, "metrics": {}, "value": None, "status": "failed",
              "seconds": 0.0, "reports": reporter.reports}
    started, error = time.perf_counter(), None
    try:
        metrics = trial_fn(dict(params), reporter)
        if not isinstance(metrics, dict):
            raise TypeError(f"the trial function returned {type(metrics).__name__}: expected a dict of metrics")
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
        status = "pruned" if reporter.pruned else "completed"
        value = record["metrics"].get(config.metric)
        if value is None and status == "pruned" and reporter.reports:
            value = reporter.reports[-1][1]      # stopped before its final evaluation: the last report
        if value is None:
            raise ValueError(f"the trial returned metrics {sorted(record['metrics'])}: expected "
                           f"search.metric={config.metric!r} among them")
        if not math.isfinite(value):
            raise ValueError(f"search.metric {config.metric}={value}: expected a finite number")
        record["value"], record["status"] = value, status
    except Exception as exc:  # one bad trial (divergence, OOM, bad params) must not end the search
        error = exc
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = time.perf_counter() - started
    return record, error


def _best(trials: list[dict], mode: str) -> Optional[int]:
    """Index of the best completed trial (pruned ones only if none completed); the first wins a tie."""
    for status in ("completed", "pruned"):
        candidates = [i for i, t in enumerate(trials) if t["status"] == status]
        if candidates:
            pick = max if mode == "max" else min
            return pick(candidates, key=lambda i: trials[i]["value"])
    return None


def _with_params(base: Optional[dict], params: dict) -> dict:
    """A deep copy of `base` with each dotted key set to its value (sections created as needed)."""
    data = copy.deepcopy(base) if base else {}
    for key, value in params.items():
        node, parts = data, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"search.space key {key!r}: {'.'.join(parts[:depth + 1])} is a value in the "
                                  f"base config ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return data


# ---- reporting ---------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def format_table(trials: list[dict], config: SearchConfig, specs: list[ParamSpec], best: Optional[int]) -> str:
    """Markdown: a summary line and one row per trial (the best one starred)."""
    names = [s.name for s in specs]
    lines = ["# Hyperparameter search", "",
             f"method: {config.method} · trials: {len(trials)} · metric: {config.metric} ({config.mode}) · "
             f"seed: {config.seed} · pruning: {'on' if config.prune else 'off'}", ""]
    if best is not None:
        lines += [f"best: trial {trials[best]['index']} · {config.metric} = {_cell(trials[best]['value'])}", ""]
    lines.append("| trial | " + " | ".join(names) + f" | {config.metric} | status | seconds |")
    lines.append("|---:|" + "---:|" * len(names) + "---:|---|---:|")
    for i, t in enumerate(trials):
        status = t["status"] + (f": {t['error']}" if t.get("error") else "")
        value = "" if t["value"] is None else _cell(t["value"])
        row = [f"{t['index']}{' ★' if i == best else ''}", *(_cell(t["params"][n]) for n in names), value,
               _cell(status), f"{t['seconds']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _trial_line(record: dict, n: int, config: SearchConfig) -> str:
    params = " ".join(f"{k}={_cell(v)}" for k, v in record["params"].items())
    outcome = (f"{config.metric}={record['value']:.4g}" if record["value"] is not None
               else record.get("error", ""))
    return f"trial {record['index'] + 1}/{n} {record['status']}: {outcome} | {params} ({record['seconds']:.1f} s)"


def _jsonable(record: dict) -> dict:
    """Non-finite floats as "nan" / "inf" strings (bare NaN is not JSON), as RunLogger writes them."""
    def plain(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(record)
