"""Selective PEFT benchmark: the selective methods on MiniLM / SST-2 beside LoRA and full
fine-tuning, and llmkit's sparse delta against the usual way of doing sparse fine-tuning with
transformers (a gradient mask on the dense weights).

(a) `sst2`: every method through its recipe (recipes/peft_<method>_minilm_sst2.yaml), on the
    budget of results/peft_sst2.md: 4,000 train rows, 125 steps of 32, dev (872) every 25 steps,
    best kept; one fresh process per run (bench_peft.sst2_worker): dev accuracy, trainable
    parameters, optimizer-state bytes (the Trainer's optimizer, measured after training), peak
    RSS, s/step, and the time apply() took (a data-driven selection: Fisher, sensitivity).
    `--variant METHOD:key=value,...` adds a run (Child-tuning_D is one).
(b) `masked`: one training step (forward, cross-entropy, backward, AdamW with weight decay 0.01) of
    MiniLM + 2-label head with 0.5% of every Linear weight trainable (the smallest |θ|, PaFi's mask),
    llmkit's sparse delta against transformers' BertForSequenceClassification with the same mask
    applied to the gradients (hooks zeroing masked entries, a dense AdamW): step time, optimizer
    state, peak RSS, and how many masked-out entries moved after the steps. Fresh process per side,
    ABBA, medians.

Run:  .venv/bin/python benchmarks/bench_peft_selective.py --quick        (smoke)
      .venv/bin/python benchmarks/bench_peft_selective.py --write        (writes results/peft_selective*.md)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import bench_peft
from bench_peft import RESULTS, llmkit_classifier, minilm_path, sst2_batch, sst2_worker

SST2_METHODS = "bitfit,pafi,fishmask,fish_dip,child_tuning,diff_pruning,far,spt,lora,full"
CHILD_D = "child_tuning:peft.mode=D,peft.p_d=0.3,peft.density=null"
DENSITY = 0.005


def run_subprocess(args: list[str]) -> dict:
    return bench_peft.run_subprocess(args, __file__)


# ---- (a) SST-2 -----------------------------------------------------------------------------------

def part_sst2(opts) -> str:
    runs = [(m, []) for m in opts.methods] + [(v.partition(":")[0], v.partition(":")[2].split(","))
                                              for v in opts.variant]
    results = []
    for method, extra in runs:
        args = ["--worker", "sst2", "--method", method, *(["--quick"] if opts.quick else [])]
        args += [a for o in extra for a in ("--override", o)]
        r = run_subprocess(args)
        r["label"] = method + (f" ({', '.join(o.split('.', 1)[-1] for o in extra)})" if extra else "")
        results.append(r)
        print(f"{r['label']}: {100 * r['dev_accuracy']:.2f}, state {r['optimizer_state_bytes'] / 2**20:.2f} MB",
              flush=True)
    full = next((r for r in results if r["method"] == "full"), None)
    lines = [f"MiniLM on SST-2 ({'quick smoke' if opts.quick else '4,000 train rows, full dev set (872)'}), "
             f"{results[0]['steps']} steps of batch 32 (recipes/peft_*_minilm_sst2.yaml, "
             "recipes/finetune_minilm_sst2.yaml); one fresh process per run", "",
             "| method | dev accuracy | vs full (points) | trainable params | % of model | optimizer state (MB) | "
             "state vs full | peak RSS (MB) | s / step | apply (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gap = f"{100 * (r['dev_accuracy'] - full['dev_accuracy']):+.2f}" if full else ""
        state = r["optimizer_state_bytes"]
        ratio = f"{100 * state / full['optimizer_state_bytes']:.2f}%" if full else ""
        lines.append(f"| {r['label']} | {100 * r['dev_accuracy']:.2f} | {gap} | {r['trainable']:,} | "
                     f"{r['percent']:.2f} | {state / 2**20:.2f} | {ratio} | {r['peak_rss_mb']:.0f} | "
                     f"{r['s_per_step']:.3f} | {r['apply_s']:.1f} |")
    return "\n".join(lines)


# ---- (b) sparse delta against a gradient mask ----------------------------------------------------

def smallest_mask(weights, k):
    """Boolean masks of the k smallest |w| over all weights together (PaFi's selection)."""
    import torch
    from llmkit.peft.selective import global_top
    index = global_top([w.abs() for w in weights], k, largest=False)
    masks = []
    for w, i in zip(weights, index):
        m = torch.zeros(w.numel(), dtype=torch.bool)
        m[i] = True
        masks.append(m.view(w.shape))
    return masks


def masked_worker(side: str, steps: int, batch: int, length: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ids, mask, labels = sst2_batch(batch, length)
    if side == "hf":
        import transformers
        model = transformers.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                                           attn_implementation="sdpa")
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n]
        weights = [m.weight for m in linears]
        masks = smallest_mask(weights, int(DENSITY * sum(w.numel() for w in weights)))
        for p in model.parameters():
            p.requires_grad_(False)
        for w, m in zip(weights, masks):              # the common recipe: mask the gradient
            w.requires_grad_(True)
            w.register_hook(lambda g, m=m: g * m)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        watched = list(zip(weights, masks))

        def loss():
            return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
    else:
        import llmkit.peft as peft
        model = llmkit_classifier()
        handle = peft.apply(model, "pafi", density=DENSITY, modules_to_save=["classifier"])
        watched = [(layer.base_layer.weight, None, layer.adapters["default"]) for _, layer in handle.layers()]

        def loss():
            return F.cross_entropy(model(ids, attention_mask=mask).logits, labels)
    before = [w.detach().clone() for w, *_ in watched]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    model.train()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    moved = 0
    with torch.no_grad():
        for (w, m, *delta), w0 in zip(watched, before):
            if side == "hf":
                moved += int(((w != w0) & ~m).sum())     # masked-out entries the optimizer moved anyway
            else:
                effective = delta[0].patched(w).reshape(-1)
                outside = torch.ones_like(effective, dtype=torch.bool)
                outside[delta[0].index] = False
                moved += int((effective[outside] != w0.reshape(-1)[outside]).sum())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"step_s": statistics.median(times), "state_bytes": state, "moved_masked": moved,
            "trainable": sum(p.numel() for p in params),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def part_masked(opts) -> str:
    rows = {"llmkit": [], "hf": []}
    for rep in range(opts.reps):
        for side in (("llmkit", "hf") if rep % 2 == 0 else ("hf", "llmkit")):
            rows[side].append(run_subprocess(["--worker", "masked", "--side", side, "--steps", str(opts.steps),
                                              "--batch", str(opts.batch), "--length", str(opts.length),
                                              "--threads", str(opts.threads)]))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss_mb")} for s, rs in rows.items()}
    one = {s: rs[0] for s, rs in rows.items()}
    lines = [f"MiniLM + 2-label head, batch {opts.batch} x {opts.length}, {DENSITY:.1%} of every Linear weight "
             f"trainable (the smallest |w|) + the head, AdamW lr 1e-3, weight decay 0.01, fp32; {opts.steps} timed "
             f"steps after 2 warm-up, {opts.reps} fresh processes per side (ABBA), medians", "",
             "| | llmkit sparse delta | transformers + gradient mask | ratio |", "|---|---|---|---|",
             f"| step time (s) | {med['llmkit']['step_s']:.3f} | {med['hf']['step_s']:.3f} | "
             f"{med['hf']['step_s'] / med['llmkit']['step_s']:.2f}x faster |",
             f"| optimizer state (MB) | {one['llmkit']['state_bytes'] / 2**20:.2f} | {one['hf']['state_bytes'] / 2**20:.2f} | "
             f"{one['hf']['state_bytes'] / one['llmkit']['state_bytes']:.1f}x smaller |",
             f"| peak RSS (MB) | {med['llmkit']['peak_rss_mb']:.0f} | {med['hf']['peak_rss_mb']:.0f} | "
             f"{med['hf']['peak_rss_mb'] / med['llmkit']['peak_rss_mb']:.2f}x lower |",
             f"| masked-out entries moved after {opts.steps + 2} steps | {one['llmkit']['moved_masked']:,} | "
             f"{one['hf']['moved_masked']:,} | |",
             f"| trainable (optimizer) params | {one['llmkit']['trainable']:,} | {one['hf']['trainable']:,} | |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--parts", default="masked,sst2")
    ap.add_argument("--methods", default=SST2_METHODS)
    ap.add_argument("--variant", action="append", default=None, help="sst2: an extra run, METHOD:key=value,...")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--worker"), ap.add_argument("--side"), ap.add_argument("--method")
    ap.add_argument("--override", action="append", default=[])
    opts = ap.parse_args()
    if opts.worker == "sst2":
        print(json.dumps(sst2_worker(opts.method, opts.quick, opts.override)))
        return
    if opts.worker == "masked":
        print(json.dumps(masked_worker(opts.side, opts.steps, opts.batch, opts.length, opts.threads)))
        return
    opts.variant = [CHILD_D] if opts.variant is None else opts.variant
    opts.reps = opts.reps or (1 if opts.quick else 4)
    opts.steps = opts.steps or (2 if opts.quick else 10)
    if opts.quick:
        opts.batch, opts.length = 8, 32
    opts.methods = [m for m in opts.methods.split(",") if m]
    from machine_info import machine_line
    header = (f"machine: {machine_line()}, torch threads {opts.threads}; "
              f"{time.strftime('%Y-%m-%d')}{' (--quick smoke run: not a measurement)' if opts.quick else ''}")
    files = {"sst2": "peft_selective.md", "masked": "peft_selective_vs_masked_grad.md"}
    parts = {"sst2": part_sst2, "masked": part_masked}
    for part in opts.parts.split(","):
        text = parts[part](opts)
        print(text + "\n", flush=True)
        if opts.write:
            (RESULTS / files[part]).write_text(f"# {files[part][:-3]}\n\n{header}\n\n{text}\n")


if __name__ == "__main__":
    main()
