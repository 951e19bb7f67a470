"""Additive PEFT benchmark: the eight additive methods on MiniLM / SST-2 beside LoRA and full
fine-tuning, their speed against HF peft, and CoDA's inference time.

(a) `sst2`: every method through its recipe (recipes/peft_<method>_minilm_sst2.yaml), on the
    budget of results/peft_sst2.md: 4,000 train rows, 125 steps of 32, dev (872) every 25 steps,
    best kept; one fresh process per run (bench_peft.sst2_worker): dev accuracy, trainable
    parameters, peak RSS, s/step. `--catch-up` adds prompt tuning at 4x the steps.
(b) `speed`: one training step (forward, cross-entropy, backward, AdamW), llmkit vs transformers +
    peft on the same weights and batch: MiniLM + 2-label head with prompt tuning (20 virtual
    tokens) and (IA)³ (keys, values, FFN output); prefix tuning (20 positions, no projection:
    peft's default) on a Llama of MiniLM's size (d 384, 6 layers, random weights written once with
    llmkit.save_hf), causal-LM loss, because peft's prefix tuning needs past_key_values, which
    transformers 5's BertModel no longer takes. Fresh process per side, ABBA, median step time.
    `inproc`: the same steps with both sides built in one process, alternating step by step.
(c) `coda`: inference (no grad) time of MiniLM with CoDA (k = n/3 tokens through the frozen
    attention and FFN) against a parallel adapter of the same bottleneck on both sublayers.

Run:  .venv/bin/python benchmarks/bench_peft_additive.py --quick        (smoke)
      .venv/bin/python benchmarks/bench_peft_additive.py --write        (writes results/peft_additive*.md)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import bench_peft
from bench_peft import RESULTS, llmkit_classifier, minilm_path, sst2_batch, sst2_worker

SST2_METHODS = "serial_adapter,parallel_adapter,coda,prompt_tuning,prefix_tuning,p_tuning_v2,apt,ia3,lora,full"
SPEED_METHODS = ("prompt_tuning", "prefix_tuning", "ia3")
P = 20


def run_subprocess(args: list[str]) -> dict:
    return bench_peft.run_subprocess(args, __file__)


# ---- (a) SST-2 -----------------------------------------------------------------------------------

def part_sst2(opts) -> str:
    runs = [(m, []) for m in opts.methods]
    if opts.catch_up:
        runs.append(("prompt_tuning", ["train.max_steps=500", "train.eval_every=100", "train.warmup_steps=25"]))
    for variant in opts.variant:                  # "method:key=value,key=value"
        method, _, overrides = variant.partition(":")
        runs.append((method, overrides.split(",")))
    results = []
    for method, extra in runs:
        args = ["--worker", "sst2", "--method", method, *(["--quick"] if opts.quick else [])]
        args += [a for o in extra for a in ("--override", o)]
        r = run_subprocess(args)
        r["label"] = method + (f" ({', '.join(o.split('.', 1)[-1] for o in extra)})" if extra else "")
        results.append(r)
        print(f"{r['label']}: {100 * r['dev_accuracy']:.2f}", flush=True)
    lines = [f"MiniLM on SST-2 ({'quick smoke' if opts.quick else '4,000 train rows, full dev set (872)'}), "
             f"{results[0]['steps']} steps of batch 32 unless said (recipes/peft_*_minilm_sst2.yaml, "
             "recipes/finetune_minilm_sst2.yaml); one fresh process per run", "",
             "| method | dev accuracy | vs LoRA (points) | trainable params | % of model | peak RSS (MB) | s / step |",
             "|---|---|---|---|---|---|---|"]
    lora = next((r["dev_accuracy"] for r in results if r["method"] == "lora"), None)
    for r in results:
        gap = f"{100 * (r['dev_accuracy'] - lora):+.2f}" if lora is not None else ""
        lines.append(f"| {r['label']} | {100 * r['dev_accuracy']:.2f} | {gap} | {r['trainable']:,} | "
                     f"{r['percent']:.2f} | {r['peak_rss_mb']:.0f} | {r['s_per_step']:.3f} |")
    return "\n".join(lines)


# ---- (b) speed against HF peft -------------------------------------------------------------------

def hf_model(method: str, torch):
    import transformers
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    model = transformers.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                                       attn_implementation="sdpa")
    ffn = r".*layer\.\d+\.output\.dense"          # the FFN's output Linear (not attention.output.dense)
    config = {"prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=P),
              "prefix_tuning": lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=P),
              "ia3": lambda: IA3Config(task_type=TaskType.SEQ_CLS, target_modules=rf".*\.(key|value)|{ffn}",
                                       feedforward_modules=ffn)}[method]()
    return get_peft_model(model, config)


def llmkit_model(method: str):
    import llmkit.peft as peft
    model = llmkit_classifier()
    options = {"prompt_tuning": dict(num_virtual_tokens=P), "prefix_tuning": dict(num_virtual_tokens=P, projection=False),
               "ia3": {}}[method]
    peft.apply(model, method, train_head=True, **options)
    return model


DECODER = Path("/tmp/llmkit_bench_llama_minilm_size")


def write_decoder() -> None:
    """A Llama with MiniLM's width and depth, random weights, as HF files both sides load."""
    import torch
    import llmkit
    torch.manual_seed(0)
    config = llmkit.get_preset("llama-tiny", vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6,
                               d_ff=1536, max_seq_len=512)
    llmkit.save_hf(llmkit.build_model(config), DECODER)


def decoder_model(side: str):
    import torch
    if side == "hf":
        import transformers
        from peft import PrefixTuningConfig, TaskType, get_peft_model
        model = transformers.AutoModelForCausalLM.from_pretrained(DECODER, attn_implementation="sdpa")
        return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    import llmkit
    import llmkit.peft as peft
    model = llmkit.load_hf(DECODER)
    peft.apply(model, "prefix_tuning", num_virtual_tokens=P, projection=False)
    return model


def side_step(side: str, method: str, batch: int, length: int):
    """(model, one training step) for one side, as speed_worker builds them."""
    import torch
    import torch.nn.functional as F
    ids, mask, labels = sst2_batch(batch, length)
    if method == "prefix_tuning":
        ids = torch.randint(0, 8192, (batch, length), generator=torch.Generator().manual_seed(0))
        model = decoder_model(side)
        loss_of = lambda logits: F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        forward = (lambda: model(input_ids=ids).logits) if side == "hf" else (lambda: model(ids).logits)
    else:
        model = hf_model(method, torch) if side == "hf" else llmkit_model(method)
        loss_of = lambda logits: F.cross_entropy(logits, labels)
        forward = ((lambda: model(input_ids=ids, attention_mask=mask).logits) if side == "hf"
                   else (lambda: model(ids, attention_mask=mask).logits))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss_of(forward()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def speed_worker(side: str, method: str, steps: int, batch: int, length: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, step = side_step(side, method, batch, length)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"side": side, "method": method, "step_s": statistics.median(times),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def inproc_worker(method: str, steps: int, batch: int, length: int, threads: int) -> dict:
    """Both sides in one process, steps alternated ABBA: no between-process variation."""
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    runs = {side: side_step(side, method, batch, length)[1] for side in ("llmkit", "hf")}
    for run in runs.values():
        run(), run()
    times = {"llmkit": [], "hf": []}
    for i in range(steps):
        for side in (("llmkit", "hf") if i % 2 == 0 else ("hf", "llmkit")):
            t = time.perf_counter()
            runs[side]()
            times[side].append(time.perf_counter() - t)
    return {side: statistics.median(ts) for side, ts in times.items()}


def part_inproc(opts) -> str:
    write_decoder()
    lines = [f"The same steps as above with both sides in one process, steps alternated ABBA, {2 * opts.steps} steps "
             f"per side per process, median over {opts.reps} processes", "",
             "| method | llmkit step (s) | HF peft step (s) | speed (HF / llmkit) |", "|---|---|---|---|"]
    for method in SPEED_METHODS:
        rows = [run_subprocess(["--worker", "inproc", "--method", method, "--steps", str(2 * opts.steps),
                                "--batch", str(opts.batch), "--length", str(opts.length),
                                "--threads", str(opts.threads)]) for _ in range(opts.reps)]
        a, b = statistics.median(r["llmkit"] for r in rows), statistics.median(r["hf"] for r in rows)
        lines.append(f"| {method} | {a:.4f} | {b:.4f} | {b / a:.2f}x |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def part_speed(opts) -> str:
    lines = [f"One training step, float32, batch {opts.batch} x {opts.length} tokens: MiniLM + 2-label head (trained in "
             "both) on SST-2 sentences for prompt tuning and (IA)³; for prefix tuning the Llama of MiniLM's size with "
             f"causal-LM loss on random tokens (see the script's docstring); {opts.threads} threads, fresh process per side, sides in ABBA order, median of "
             f"{opts.reps} processes x {opts.steps} steps", "",
             "| method | llmkit step (s) | HF peft step (s) | speed (HF / llmkit) | llmkit RSS (MB) | HF RSS (MB) | "
             "trainable llmkit / HF |", "|---|---|---|---|---|---|---|"]
    write_decoder()
    for method in SPEED_METHODS:
        rows = {"llmkit": [], "hf": []}
        for rep in range(opts.reps):
            for side in (("llmkit", "hf") if rep % 2 == 0 else ("hf", "llmkit")):
                rows[side].append(run_subprocess(["--worker", "speed", "--side", side, "--method", method,
                                                  "--steps", str(opts.steps), "--batch", str(opts.batch),
                                                  "--length", str(opts.length), "--threads", str(opts.threads)]))
        med = {s: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss_mb")} for s, rs in rows.items()}
        a, b = med["llmkit"]["step_s"], med["hf"]["step_s"]
        lines.append(f"| {method} | {a:.4f} | {b:.4f} | {b / a:.2f}x | {med['llmkit']['peak_rss_mb']:.0f} | "
                     f"{med['hf']['peak_rss_mb']:.0f} | {rows['llmkit'][0]['trainable']:,} / {rows['hf'][0]['trainable']:,} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


# ---- (c) CoDA inference --------------------------------------------------------------------------

def coda_worker(method: str, steps: int, batch: int, length: int, threads: int) -> dict:
    import torch
    import llmkit.peft as peft
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ids, mask, _ = sst2_batch(batch, 64)
    ids, mask = ids.repeat(1, length // 64), torch.ones(batch, length, dtype=torch.long)   # full-length rows
    model = llmkit_classifier().eval()
    options = dict(bottleneck=24, sublayer="both", scale=4.0)
    if method == "coda":
        options["token_reduction"] = 3
    handle = peft.apply(model, "coda" if method == "coda" else "parallel_adapter", **options)
    with torch.inference_mode():
        for _ in range(2):
            model(ids, attention_mask=mask)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model(ids, attention_mask=mask)
            times.append(time.perf_counter() - t)
    return {"method": method, "forward_s": statistics.median(times), "trainable": handle.expected_trainable()}


def part_coda(opts) -> str:
    lines = [f"Inference forward (torch.inference_mode), MiniLM, batch {opts.batch} x {opts.coda_length} tokens, "
             f"bottleneck 24 on attention and FFN, {opts.threads} threads, fresh process per side, ABBA, median of "
             f"{opts.reps} x {opts.steps} forwards", "",
             "| method | forward (s) | adapter params | speed-up |", "|---|---|---|---|"]
    rows = {"parallel": [], "coda": []}
    for rep in range(opts.reps):
        for side in (("parallel", "coda") if rep % 2 == 0 else ("coda", "parallel")):
            rows[side].append(run_subprocess(["--worker", "coda", "--method", side, "--steps", str(opts.steps),
                                              "--batch", str(opts.batch), "--length", str(opts.coda_length),
                                              "--threads", str(opts.threads)]))
    base = statistics.median(r["forward_s"] for r in rows["parallel"])
    for side, label in (("parallel", "parallel adapter (every token through every sublayer)"),
                        ("coda", "CoDA, k = n/3 tokens through the frozen sublayers")):
        t = statistics.median(r["forward_s"] for r in rows[side])
        lines.append(f"| {label} | {t:.4f} | {rows[side][0]['trainable']:,} | {base / t:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--parts", default="speed,coda,sst2")
    ap.add_argument("--methods", default=SST2_METHODS)
    ap.add_argument("--catch-up", action="store_true", help="sst2: also prompt tuning with 4x the steps")
    ap.add_argument("--variant", action="append", default=[], help="sst2: an extra run, METHOD:key=value,...")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--coda-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--worker"), ap.add_argument("--side"), ap.add_argument("--method")
    ap.add_argument("--override", action="append", default=[])
    opts = ap.parse_args()
    if opts.worker == "sst2":
        print(json.dumps(sst2_worker(opts.method, opts.quick, opts.override)))
        return
    if opts.worker == "speed":
        print(json.dumps(speed_worker(opts.side, opts.method, opts.steps, opts.batch, opts.length, opts.threads)))
        return
    if opts.worker == "inproc":
        print(json.dumps(inproc_worker(opts.method, opts.steps, opts.batch, opts.length, opts.threads)))
        return
    if opts.worker == "coda":
        print(json.dumps(coda_worker(opts.method, opts.steps, opts.batch, opts.length, opts.threads)))
        return
    opts.reps = opts.reps or (1 if opts.quick else 4)
    opts.steps = opts.steps or (2 if opts.quick else 10)
    if opts.quick:
        opts.batch, opts.length, opts.coda_length = 8, 32, 64
    opts.methods = [m for m in opts.methods.split(",") if m]
    from machine_info import machine_line
    header = (f"machine: {machine_line()}, torch threads {opts.threads}; "
              f"{time.strftime('%Y-%m-%d')}{' (--quick smoke run: not a measurement)' if opts.quick else ''}")
    files = {"speed": "peft_additive_vs_hf.md", "inproc": "peft_additive_vs_hf_one_process.md",
             "coda": "peft_coda_inference.md", "sst2": "peft_additive.md"}
    parts = {"speed": part_speed, "inproc": part_inproc, "coda": part_coda, "sst2": part_sst2}
    for part in opts.parts.split(","):
        text = parts[part](opts)
        print(text + "\n", flush=True)
        if opts.write:
            (RESULTS / files[part]).write_text(f"# {files[part][:-3]}\n\n{header}\n\n{text}\n")


if __name__ == "__main__":
    main()
