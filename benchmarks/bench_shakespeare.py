"""Shakespeare-char benchmark: nanoGPT's CPU run as an llmkit recipe, and transformers' GPT-2 on the same loop.

recipes/shakespeare_char.yaml is nanoGPT's config/train_shakespeare_char.py with its README's CPU
settings (4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4,
warmup 100, AdamW beta2 0.99, weight decay 0.1, dropout 0, no biases, char tokenizer, 90/10 split).
The anchor: unmodified nanoGPT reached val loss 1.886 at step 2000 in 327 s (116 ms/iteration) on
this machine type. The goal: val loss <= 1.90 in at most 0.6 x 327 s = 196 s.

What runs, in one process with torch.set_num_threads(2):
  1. full runs of --steps (2000): the recipe through prepare_pretraining(parse_recipe(...)) and
     .trainer().fit(), in fp32 and with bf16 autocast; and transformers' GPT2LMHeadModel on the
     same config (n_layer 4, n_head 4, n_embd 128, n_positions 64, the char vocab, dropout 0,
     exact GELU, sdpa; GPT-2 always has biases) trained by the SAME Trainer, optimizer, schedule,
     batches and validation windows, with the same shifted cross-entropy against batch["targets"].
     Order: llmkit fp32, HF fp32, HF bf16, llmkit bf16 (ABBA). The time is fit()'s wall clock: the
     steps plus the recipe's periodic evaluations (every 250 steps, 20 fixed val batches), its
     checkpoints (every 500 steps) and JSONL logging; tokenizing and model building are timed apart.
  2. a final val loss over a larger fixed set, 200 batches of 12 random val windows of 64 tokens
     (seed 777), in fp32, next to the recipe's own 20-batch evaluation.
  3. short runs (--short-steps, 200) of each, interleaved ABBA, plus a bare loop (no Trainer) over
     the llmkit model: the median step-to-step wall time is the steady-state ms/iteration.
  4. the cost of the progress bar, TensorBoard and the loss plot, measured on their own; the timed
     runs turn them off (train.progress/tensorboard/plot=false).
Contention: the machine may be shared. Before the first timed run the 1-minute load average must
be <= --max-load (else sleep 60 s and retry); before each run other processes' CPU use is sampled
for 3 s, and during each run it is measured from /proc/stat (all CPU time minus this process's). A
run during which other processes used more than --max-other cores is redone (up to --retries);
a result still contended is marked, and --write refuses to write it.

Run:  .venv/bin/python benchmarks/bench_shakespeare.py --write     (full: ~10 min on 2 idle cores)
      .venv/bin/python benchmarks/bench_shakespeare.py --quick     (100 steps: a smoke run)
      .venv/bin/python benchmarks/bench_shakespeare.py --skip-hf   (llmkit rows only)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from machine_info import cpu_model
import torch.nn.functional as F

from llmkit.data import RandomWindowBatches, load_shards
from llmkit.pretrain import parse_recipe, prepare_pretraining
from llmkit.recipes import load_yaml
from llmkit.train import Trainer
from llmkit.train.logging import ProgressBar, RunLogger, plot_losses

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "shakespeare_char.yaml"
RESULTS = Path(__file__).resolve().parent / "results" / "shakespeare_char.md"
NANOGPT = dict(val_loss=1.886, seconds=327.0, ms_per_iter=116.0)   # unmodified nanoGPT, this machine type
GOAL_TIME_FACTOR, GOAL_VAL_LOSS = 0.6, 1.90
FINAL_EVAL_BATCHES, FINAL_EVAL_SEED = 200, 777
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- contention ------------------------------------------------------------------------------------
def _busy_seconds() -> float:
    """CPU time (s) spent by everything on the machine: user+nice+system+irq+softirq+steal."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class OtherCpu:
    """Cores used on average by OTHER processes while the block runs (machine busy time minus ours)."""

    def __enter__(self):
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        self.cores = max(0.0, (_busy_seconds() - self._busy) - (_own_seconds() - self._own)) / max(wall, 1e-9)
        return False


def other_cpu_now(seconds: float = 3.0) -> float:
    with OtherCpu() as probe:
        time.sleep(seconds)
    return probe.cores


class Quiet:
    """Waits for an idle machine before timed runs and checks that each run stayed uncontended."""

    def __init__(self, max_load: float, max_other: float, max_wait: float, retries: int, wait: bool):
        self.max_load, self.max_other, self.max_wait, self.retries, self.wait = (
            max_load, max_other, max_wait, retries, wait)
        self.start_load = None

    def _sleep_or_give_up(self, waited: float, why: str) -> bool:
        if not self.wait or waited >= self.max_wait:
            print(f"  [contention] {why}; {'not waiting (--quick)' if not self.wait else 'gave up waiting'}",
                  flush=True)
            return False
        print(f"  [contention] {why}; sleeping 60 s", flush=True)
        time.sleep(60)
        return True

    def first(self) -> float:
        """The 1-minute load average before anything of ours runs must be <= max_load."""
        waited = 0.0
        while load1() > self.max_load and self._sleep_or_give_up(waited, f"load average {load1():.2f} > "
                                                                         f"{self.max_load}"):
            waited += 60
        self.start_load = load1()
        return self.start_load

    def before_run(self) -> float:
        """Other processes' CPU use sampled for 3 s (our own previous run does not count)."""
        waited = 0.0
        other = other_cpu_now()
        while other > self.max_other and self._sleep_or_give_up(
                waited, f"other processes use {other:.2f} cores > {self.max_other}"):
            waited += 60
            other = other_cpu_now()
        return other

    def run(self, label: str, fn):
        """fn() -> result dict; adds load1_before, other_cores_before/during, contended; redoes a contended run."""
        for attempt in range(self.retries + 1):
            before, load = self.before_run(), load1()
            with OtherCpu() as during:
                result = fn()
            result.update(load1_before=load, other_cores_before=before, other_cores_during=during.cores,
                          contended=during.cores > self.max_other)
            if not result["contended"]:
                return result
            print(f"  [contention] {label}: other processes used {during.cores:.2f} cores during the run"
                  + (f"; redoing it ({attempt + 1}/{self.retries})" if attempt < self.retries else
                     "; keeping it, marked CONTENDED"), flush=True)
        return result


# ---- runs ------------------------------------------------------------------------------------------
def recipe_dict(out_dir: Path, cache_dir: Path, steps: int, precision: str, eval_every: int | None = None) -> dict:
    """The recipe as written, with the data path made absolute, outputs in a temp dir and the
    progress bar, TensorBoard and plot off."""
    data = load_yaml(RECIPE)
    source = Path(data["data"]["source"])
    data["data"]["source"] = str(source if source.is_absolute() else (ROOT / source).resolve())
    data["data"]["cache_dir"] = str(cache_dir)
    train = data["train"]
    train.update(out_dir=str(out_dir), max_steps=steps, precision=precision,
                 progress=False, tensorboard=False, plot=False)
    if eval_every is not None:
        train["eval_every"] = eval_every
    return data


class StepClock:
    """Trainer callback: wall time between consecutive on_step_end calls (a whole loop iteration)."""

    def __init__(self):
        self.last, self.deltas, self.eval_steps = None, [], set()

    def on_step_end(self, trainer, step, metrics):
        now = time.perf_counter()
        if self.last is not None:
            self.deltas.append((step, now - self.last))
        self.last = now

    def on_eval(self, trainer, step, metrics):
        self.eval_steps.add(step + 1)          # the next interval holds the evaluation (and checkpoint)

    def ms_per_iter(self, skip: int = 10) -> float:
        """Median over steps after `skip`, leaving out intervals that contain an evaluation or a save."""
        saves = {s + 1 for s, _ in self.deltas if s % 500 == 0}
        kept = [d for s, d in self.deltas if s > skip and s not in self.eval_steps and s not in saves]
        return 1e3 * statistics.median(kept) if kept else float("nan")


def hf_gpt2(vocab_size: int, recipe):
    """transformers' GPT-2 on the recipe's shape (it always has biases in linears and LayerNorms)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    m = recipe.model
    config = GPT2Config(vocab_size=vocab_size, n_positions=m["max_seq_len"], n_embd=m["d_model"],
                        n_layer=m["n_layers"], n_head=m["n_heads"], n_inner=m["d_ff"],
                        activation_function="gelu",            # exact GELU, as nanoGPT and the recipe
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        use_cache=False, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(recipe.train.seed)
    return GPT2LMHeadModel(config)


def hf_clm_loss(model, batch: dict):
    """llmkit's clm_loss for "targets" batches, calling the HF model with labels=None."""
    logits = model(input_ids=batch["input_ids"]).logits                                # (B, T, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["targets"].reshape(-1),
                           ignore_index=-100)
    value = loss.item()
    return loss, {"loss": value, "ppl": math.exp(min(value, 80.0)) if math.isfinite(value) else float("nan")}


def num_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def big_val_loss(model, family: str, val_tokens, batch_size: int, block_size: int) -> tuple[float, float]:
    """(mean, standard error) of the loss over FINAL_EVAL_BATCHES fixed random val batches, fp32."""
    windows = RandomWindowBatches(val_tokens, batch_size, block_size, seed=FINAL_EVAL_SEED)
    model.eval()
    losses = []
    for i in range(FINAL_EVAL_BATCHES):
        batch = windows.batch_at(i)
        logits = (model(input_ids=batch["input_ids"]) if family == "hf" else model(batch["input_ids"])).logits
        losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1)).item())
    model.train()
    return statistics.fmean(losses), statistics.stdev(losses) / math.sqrt(len(losses))


def make_trainer(family: str, tmp: Path, cache: Path, steps: int, precision: str, eval_every=None,
                 val: bool = True):
    """(trainer, setup, model, prepare_seconds) for llmkit's recipe model or HF GPT-2 on the same data."""
    out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{family}_{precision}_"))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):          # its "data: ..." / "model: ..." lines
        setup = prepare_pretraining(parse_recipe(recipe_dict(out, cache, steps, precision, eval_every)))
    if family == "llmkit":
        trainer = setup.trainer()
        model = setup.model
    else:
        model = hf_gpt2(setup.tokenizer.vocab_size, setup.recipe)
        trainer = Trainer(model, hf_clm_loss, setup.train_batches, val_data=setup.val_data,
                          config=setup.recipe.train)
    if not val:
        trainer.val_data = None
    return trainer, setup, model, time.perf_counter() - start


def full_run(family: str, precision: str, tmp: Path, cache: Path, steps: int) -> dict:
    trainer, setup, model, prep = make_trainer(family, tmp, cache, steps, precision)
    clock = StepClock()
    trainer.callbacks.append(clock)
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    data = setup.recipe.data
    big, big_se = big_val_loss(model, family, load_shards(Path(data.cache_dir), "val"), data.batch_size,
                               data.block_size)
    return dict(family=family, precision=precision, steps=result.step, seconds=seconds, prepare_s=prep,
                ms_per_iter=clock.ms_per_iter(), recipe_val=result.val_loss, big_val=big, big_val_se=big_se,
                train_loss=result.train_loss, params=num_params(model))


def short_run(family: str, precision: str, tmp: Path, cache: Path, steps: int) -> dict:
    """A Trainer run with no evaluation: its median step-to-step time."""
    trainer, _, _, _ = make_trainer(family, tmp, cache, steps, precision, eval_every=0, val=False)
    clock = StepClock()
    trainer.callbacks.append(clock)
    trainer.fit()
    return dict(ms=clock.ms_per_iter(skip=min(10, steps // 4)))


def bare_run(precision: str, tmp: Path, cache: Path, steps: int) -> dict:
    """The llmkit model, optimizer, schedule and batches in a plain loop: no Trainer, no .item()."""
    trainer, setup, model, _ = make_trainer("llmkit", tmp, cache, steps, precision, eval_every=0, val=False)
    cfg = setup.recipe.train
    optimizer, scheduler = trainer.optimizer, trainer.scheduler     # what the Trainer would step
    batches = setup.train_batches
    model.train()
    times = []
    for step in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch["input_ids"]).logits                                  # (B, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["targets"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    skip = min(10, steps // 4)
    return dict(ms=1e3 * statistics.median(times[skip:]))


# ---- extras' cost ----------------------------------------------------------------------------------
def extras_cost(tmp: Path, steps: int, log_every: int) -> dict:
    """Seconds each optional output costs over a run of `steps`, first use in this process (imports included)."""
    out = {}
    sink = io.StringIO()
    start = time.perf_counter()
    bar = ProgressBar(steps, file=sink)
    for step in range(1, steps + 1):
        bar.update(step, loss=2.0 + 1 / step, lr=1e-3, tok_per_s=25_000.0)
    bar.close()
    out["progress"] = time.perf_counter() - start
    n_logs = steps // log_every + 10
    for tb in (False, True):
        start = time.perf_counter()
        logger = RunLogger(tmp / f"logger_tb{tb}", tensorboard=tb)
        for i in range(n_logs):
            logger.log(i * log_every, {"loss": 2.0 + 1 / (i + 1), "lr": 1e-3, "grad_norm": 0.5, "ppl": 7.0,
                                       "step_time_s": 0.04, "tokens_per_s": 2e4})
        logger.close()
        out[f"logger_tb_{tb}"] = time.perf_counter() - start
    out["tensorboard"] = out["logger_tb_True"] - out["logger_tb_False"]
    start = time.perf_counter()
    plot_losses(tmp / "logger_tbFalse" / "metrics.jsonl", tmp / "loss.png")
    out["plot"] = time.perf_counter() - start
    return out


# ---- report ----------------------------------------------------------------------------------------
def machine() -> str:
    try:
        import transformers
        hf = f"transformers {transformers.__version__}, "
    except ImportError:
        hf = ""
    return (f"{cpu_model()}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, {hf}{torch.get_num_threads()} threads, python "
            f"{platform.python_version()}, {datetime.date.today().isoformat()}")


def fmt(x, spec=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(args, full: list[dict], short: dict, extras: dict, start_load: float) -> str:
    goal_s = GOAL_TIME_FACTOR * NANOGPT["seconds"]
    name = {"llmkit": "llmkit", "hf": "transformers GPT2LMHeadModel"}
    lines = [
        "# Shakespeare-char: nanoGPT's CPU run as an llmkit recipe" + (" (QUICK smoke run)" if args.quick else ""),
        "",
        "- recipe: `recipes/shakespeare_char.yaml` (4 layers, 4 heads, 128 dims, block 64, batch 12, "
        f"{args.steps} iterations, lr 1e-3 cosine to 1e-4, warmup 100, AdamW beta2 0.99, wd 0.1, "
        "dropout 0, no biases, char tokenizer, 90/10 split of ../shared/data/tinyshakespeare.txt)",
        f"- anchor: unmodified nanoGPT, val loss {NANOGPT['val_loss']} at step 2000 in {NANOGPT['seconds']:.0f} s "
        f"({NANOGPT['ms_per_iter']:.0f} ms/iteration) on this machine type; goal: val loss <= {GOAL_VAL_LOSS} "
        f"in <= {GOAL_TIME_FACTOR} x {NANOGPT['seconds']:.0f} s = {goal_s:.0f} s",
        f"- machine: {machine()}",
        f"- load: 1-minute load average {start_load:.2f} before the first timed run; per run below: "
        "the load average just before it (our own previous run still counts there) and the cores other "
        "processes used during it (machine CPU time minus this process's, from /proc/stat)",
        f"- command: `.venv/bin/python benchmarks/bench_shakespeare.py {' '.join(sys.argv[1:])}`",
        "- time = `Trainer.fit()` wall clock: the steps plus the recipe's periodic evaluations (every "
        "250 steps, 20 fixed val batches), checkpoints (every 500 steps, safetensors) and JSONL logging; "
        "not included: interpreter start and imports, tokenizing + shards + model build (`prepare` "
        "column), exporting the model and samples. Progress bar, TensorBoard and loss plot off "
        "(their cost is below). ms/iter = median step-to-step wall time, evaluation/checkpoint steps left out.",
        f"- val loss: `recipe eval` = the Trainer's last evaluation (20 fixed batches of 12 x 64 val "
        "windows, under the run's precision), comparable to nanoGPT's 20-batch estimate; "
        f"`val ({FINAL_EVAL_BATCHES} batches)` = mean over {FINAL_EVAL_BATCHES} fixed random val batches "
        f"of 12 x 64 (seed {FINAL_EVAL_SEED}), fp32, +- its standard error",
        "- HF GPT-2: same shape and exact GELU, sdpa attention, tied head, trained by the same llmkit "
        "Trainer, optimizer, schedule, batches and val windows; GPT-2 always has biases (linears and "
        "LayerNorms), hence its slightly larger parameter count",
        "",
        f"| run | params | time (s) | prepare (s) | ms/iter | recipe eval val loss | val ({FINAL_EVAL_BATCHES} batches) "
        "| last train loss | load before | other cores during |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| nanoGPT (anchor) | 0.80M | {NANOGPT['seconds']:.0f} | | {NANOGPT['ms_per_iter']:.0f} | "
        f"{NANOGPT['val_loss']} | | | | |",
    ]
    for r in full:
        flag = " **CONTENDED**" if r["contended"] else ""
        lines.append(
            f"| {name[r['family']]} {r['precision']}{flag} | {r['params'] / 1e6:.3f}M | {r['seconds']:.1f} | "
            f"{r['prepare_s']:.1f} | {r['ms_per_iter']:.1f} | {fmt(r['recipe_val'])} | "
            f"{r['big_val']:.3f} +- {r['big_val_se']:.3f} | {fmt(r['train_loss'])} | {r['load1_before']:.2f} | "
            f"{r['other_cores_during']:.2f} |")
    lines += ["", "## Goal", ""]
    for r in (r for r in full if r["family"] == "llmkit"):
        ok_t = r["seconds"] <= goal_s
        ok_v = (r["recipe_val"] is not None and r["recipe_val"] <= GOAL_VAL_LOSS) and r["big_val"] <= GOAL_VAL_LOSS
        verdict = "MET" if ok_t and ok_v and args.steps == 2000 else ("not applicable (steps != 2000)"
                                                                     if args.steps != 2000 else "MISSED")
        lines.append(f"- llmkit {r['precision']}: {r['seconds']:.1f} s = {r['seconds'] / NANOGPT['seconds']:.2f} x "
                     f"nanoGPT's time (goal <= {GOAL_TIME_FACTOR}), val loss {fmt(r['recipe_val'])} (recipe eval) / "
                     f"{r['big_val']:.3f} ({FINAL_EVAL_BATCHES} batches) (goal <= {GOAL_VAL_LOSS}): **{verdict}**")
    lines += ["", "## llmkit vs transformers on the same Trainer (ratio = hf_time / llmkit_time, > 1: llmkit faster)", ""]
    by = {(r["family"], r["precision"]): r for r in full}
    rows = ["| measure | precision | llmkit | transformers | ratio |", "|---|---|---:|---:|---:|"]
    for p in ("fp32", "bf16"):
        a, b = by.get(("llmkit", p)), by.get(("hf", p))
        if a and b:
            rows.append(f"| full run, {args.steps} steps (s) | {p} | {a['seconds']:.1f} | {b['seconds']:.1f} | "
                        f"{b['seconds'] / a['seconds']:.2f} |")
            rows.append(f"| full run, val ({FINAL_EVAL_BATCHES} batches) | {p} | {a['big_val']:.3f} | "
                        f"{b['big_val']:.3f} | |")
    for p in ("fp32", "bf16"):
        a, b = short.get(("llmkit", p)), short.get(("hf", p))
        if a and b:
            rows.append(f"| short runs, {args.short_steps} steps, ms/iter | {p} | {a['ms']:.1f} | {b['ms']:.1f} | "
                        f"{b['ms'] / a['ms']:.2f} |")
    lines += rows if len(rows) > 2 else ["(transformers skipped: --skip-hf)"]
    lines += ["", f"Short runs: {args.short_steps} steps each, no evaluation, interleaved ABBA "
              f"({args.short_reps} of each), median over reps of each run's median step time.", ""]
    lines += ["## Trainer overhead and optional outputs", "",
              "| measure | fp32 | bf16 |", "|---|---:|---:|"]
    trainer_ms = [short.get(("llmkit", p), {}).get("ms") for p in ("fp32", "bf16")]
    bare_ms = [short.get(("bare", p), {}).get("ms") for p in ("fp32", "bf16")]
    lines.append(f"| llmkit Trainer step (ms/iter) | {fmt(trainer_ms[0], '.1f')} | {fmt(trainer_ms[1], '.1f')} |")
    lines.append(f"| bare loop, same model/optimizer/batches, no Trainer (ms/iter) | {fmt(bare_ms[0], '.1f')} | "
                 f"{fmt(bare_ms[1], '.1f')} |")
    if all(trainer_ms) and all(bare_ms):
        lines.append(f"| Trainer overhead | {trainer_ms[0] / bare_ms[0] - 1:+.1%} | {trainer_ms[1] / bare_ms[1] - 1:+.1%} |")
    lines += ["", f"Optional outputs over a {args.steps}-step run, measured alone (first use in the process, "
              "imports included): "
              f"progress bar {extras['progress']:.2f} s, TensorBoard {extras['tensorboard']:.2f} s "
              f"(JSONL alone {extras['logger_tb_False']:.3f} s), loss plot {extras['plot']:.2f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="iterations of the full runs (default 2000)")
    parser.add_argument("--short-steps", type=int, default=None, help="iterations of each short run (default 200)")
    parser.add_argument("--short-reps", type=int, default=2, help="short runs of each kind, ABBA (default 2)")
    parser.add_argument("--quick", action="store_true", help="100 steps, 30-step short runs, no waiting or redoing: a smoke run")
    parser.add_argument("--write", action="store_true", help=f"write the tables to {RESULTS}")
    parser.add_argument("--skip-hf", action="store_true", help="llmkit rows only")
    parser.add_argument("--max-load", type=float, default=1.2, help="1-min load average to wait for (default 1.2)")
    parser.add_argument("--max-other", type=float, default=0.25,
                        help="cores other processes may use during a timed run (default 0.25)")
    parser.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for a quiet machine")
    parser.add_argument("--retries", type=int, default=2, help="redo a contended run this many times")
    args = parser.parse_args()
    args.steps = args.steps or (100 if args.quick else 2000)
    args.short_steps = args.short_steps or (30 if args.quick else 200)
    torch.set_num_threads(THREADS)
    families = ["llmkit"] + ([] if args.skip_hf else ["hf"])
    quiet = Quiet(args.max_load, args.max_other, args.max_wait, 0 if args.quick else args.retries,
                  wait=not args.quick)

    with tempfile.TemporaryDirectory(prefix="bench_shakespeare_") as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "data"
        print("tokenizing once, then warming up (one-time kernel and import costs kept out of the timings)")
        for family in families:                   # also builds the shards into the shared cache
            for precision in ("fp32", "bf16"):
                short_run(family, precision, tmp, cache, 15)
        extras = extras_cost(tmp, args.steps, load_yaml(RECIPE)["train"]["log_every"])
        print(f"optional outputs: {', '.join(f'{k} {v:.3f} s' for k, v in extras.items())}")

        start_load = quiet.first()
        print(f"load average before the timed runs: {start_load:.2f}")
        order = [("llmkit", "fp32"), ("hf", "fp32"), ("hf", "bf16"), ("llmkit", "bf16")]
        full = []
        for family, precision in order:
            if family not in families:
                continue
            r = quiet.run(f"{family} {precision}", lambda: full_run(family, precision, tmp, cache, args.steps))
            print(f"full {family} {precision}: {r['seconds']:.1f} s, {r['ms_per_iter']:.1f} ms/iter, recipe val "
                  f"{fmt(r['recipe_val'])}, val({FINAL_EVAL_BATCHES}) {r['big_val']:.4f} +- {r['big_val_se']:.4f}, "
                  f"load {r['load1_before']:.2f}, other cores {r['other_cores_during']:.2f}", flush=True)
            full.append(r)

        short: dict = {}
        kinds = [(f, p) for p in ("fp32", "bf16") for f in families + ["bare"]]
        samples: dict = {k: [] for k in kinds}
        for rep in range(args.short_reps):
            for family, precision in (kinds if rep % 2 == 0 else kinds[::-1]):
                fn = ((lambda: bare_run(precision, tmp, cache, args.short_steps)) if family == "bare" else
                      (lambda: short_run(family, precision, tmp, cache, args.short_steps)))
                r = quiet.run(f"short {family} {precision}", fn)
                samples[(family, precision)].append(r)
                print(f"short {family} {precision}: {r['ms']:.1f} ms/iter (other cores {r['other_cores_during']:.2f})",
                      flush=True)
        for k, rs in samples.items():
            short[k] = dict(ms=statistics.median(r["ms"] for r in rs), contended=any(r["contended"] for r in rs))

    text = report(args, full, short, extras, start_load)
    contended = [f"{r['family']} {r['precision']}" for r in full if r["contended"]]
    contended += [f"short {f} {p}" for (f, p), r in short.items() if r["contended"]]
    if contended:
        text += f"\n**CONTENDED** (other processes used > {args.max_other} cores): {', '.join(contended)}\n"
    print("\n" + text)
    if args.write:
        if contended and not args.quick:
            sys.exit(f"not writing {RESULTS}: runs taken under contention ({', '.join(contended)}); rerun on a "
                     "quiet machine")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
