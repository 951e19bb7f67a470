"""DPO benchmark: llmkit's DPOObjective on llmkit's Trainer vs TRL's DPOTrainer, side by side.

Same model (a transformers LlamaForCausalLM, 4 layers, hidden 256, vocab 8192; llmkit loads the
very same weights with `llmkit.load_hf`), same data (HH-RLHF harmless pairs from ../shared/data,
BPE tokenizer trained on them, pairs kept only when prompt + longer answer fit max_length so neither
side truncates), same batch (8 pairs), fp32, AdamW, clip 1.0, reference = a frozen copy on both
sides (TRL's default when no PEFT). Each side runs in its own subprocess (no shared allocator).

Measured per side: mean optimizer-step time over the steps after the first --warmup ones (TRL:
on_step_begin -> on_step_end; llmkit: the Trainer's step_time_s, the same span), and the peak
memory the training steps add above the state before training: CUDA max_memory_allocated on a
GPU, else the peak resident set size (sampled every 2 ms). Ratios > 1 mean llmkit is better.

Run:  .venv/bin/python benchmarks/bench_dpo.py --write          (writes results/dpo.md)
      .venv/bin/python benchmarks/bench_dpo.py --quick          (smoke run)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "hh_rlhf_harmless_test.jsonl.gz"
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, vocab_size=8192)


def prepare(work: Path, args) -> None:
    """Tokenizer, rows that fit, and the shared HF checkpoint, written once into `work`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.align import normalize_rows, read_rows
    from llmkit.tokenizer import train_bpe
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = normalize_rows(read_rows(DATA), bad_rows="skip")
    tokenizer = train_bpe(texts=[r["prompt"] + r["chosen"] for r in rows[:1500]], vocab_size=MODEL["vocab_size"],
                          special_tokens=("<|endoftext|>", "<pad>"), pad_token="<pad>")
    tokenizer.save(work / "model")
    fits = [r for r in rows if r["chosen"] != r["rejected"] and len(tokenizer.encode(r["prompt"], add_special_tokens=False))
            + max(len(tokenizer.encode(r[k], add_special_tokens=False)) for k in ("chosen", "rejected")) + 1
            <= args.max_length]
    need = args.batch * (args.steps + args.warmup)
    (work / "rows.json").write_text(json.dumps(fits[:need]))
    torch.manual_seed(0)
    config = LlamaConfig(**{**MODEL, "vocab_size": tokenizer.vocab_size}, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(work / "model")
    print(f"data: {len(fits)} of {len(rows)} HH pairs fit max_length={args.max_length}; using {min(need, len(fits))}")


class PeakMemory:
    """Peak memory added while training: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device):
        import torch
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def stop(self) -> float:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.running = False
        self.thread.join()
        return (self.peak - self.base) / 2**20


def run_llmkit(work: Path, args) -> dict:
    import torch

    import llmkit
    from llmkit.align import DPOObjective, PreferenceBatches, frozen_copy, tokenize_rows
    from llmkit.train import TrainConfig, Trainer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = llmkit.load_tokenizer(work / "model")
    model = llmkit.load_hf(work / "model").to(device)
    rows = json.loads((work / "rows.json").read_text())
    examples = tokenize_rows(rows, tokenizer, max_length=args.max_length, max_prompt_length=args.max_length - 1)
    batches = PreferenceBatches(examples, args.batch, tokenizer.pad_token_id, shuffle=False)
    objective = DPOObjective(frozen_copy(model), beta=0.1)
    times = []

    class Clock:
        def on_step_end(self, trainer, step, metrics):
            times.append(metrics["step_time_s"])
    config = TrainConfig(out_dir=str(work / "llmkit_run"), max_steps=args.steps + args.warmup, lr=1e-5, warmup_steps=0,
                         schedule="constant", betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=1.0, log_every=10**6,
                         progress=False, tensorboard=False, plot=False, keep_last=1, device=device.type)
    trainer = Trainer(model, objective.loss, batches, config=config, callbacks=[Clock()])
    memory = PeakMemory(device)
    trainer.fit()
    peak = memory.stop()
    return {"step_s": statistics.mean(times[args.warmup:]), "peak_mib": peak}


def run_trl(work: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    use_cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = LlamaForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa", dtype=torch.float32)
    rows = json.loads((work / "rows.json").read_text())
    times, started = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if use_cuda:
                torch.cuda.synchronize()
            started["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if use_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started["t"])
    config = DPOConfig(output_dir=str(work / "trl_run"), per_device_train_batch_size=args.batch, max_length=args.max_length,
                       max_steps=args.steps + args.warmup, learning_rate=1e-5, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.1, logging_steps=10**6,
                       save_strategy="no", report_to=[], use_cpu=not use_cuda, bf16=False, fp16=False,
                       dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Clock()])
    memory = PeakMemory(torch.device("cuda" if use_cuda else "cpu"))
    trainer.train()
    peak = memory.stop()
    return {"step_s": statistics.mean(times[args.warmup:]), "peak_mib": peak}


def model_flops_per_step(work: Path, args) -> float:
    """Model FLOPs of one DPO step on the real (unpadded) tokens, the same count for both sides:
    per pair, prompt + chosen and prompt + rejected each run the policy forward and backward
    (6 N + 12 L d T per token) and the frozen reference forward (2 N + 4 L d T per token), with
    N the parameters that multiply (all but the embedding table) and T that sequence's length."""
    import llmkit
    from llmkit.align import tokenize_rows
    tokenizer = llmkit.load_tokenizer(work / "model")
    rows = json.loads((work / "rows.json").read_text())
    examples = tokenize_rows(rows, tokenizer, max_length=args.max_length, max_prompt_length=args.max_length - 1)
    L, d, V, f = MODEL["num_hidden_layers"], MODEL["hidden_size"], MODEL["vocab_size"], MODEL["intermediate_size"]
    kv = d * MODEL["num_key_value_heads"] // MODEL["num_attention_heads"]
    n = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * V             # q, o, k, v, gated MLP; untied lm_head
    per_pair = []
    for ex in examples:
        for answer in (ex["chosen_ids"], ex["rejected_ids"]):
            T = len(ex["prompt_ids"]) + len(answer)
            per_pair.append(T * (8 * n + 16 * L * d * T))
    return statistics.fmean(per_pair) * 2 * args.batch               # two sequences per pair


def child(side: str, work: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, short sequences: a smoke run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/dpo.md")
    parser.add_argument("--side", choices=["llmkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.max_length = 4, 1, 128
    if args.side:
        import torch
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        result = (run_llmkit if args.side == "llmkit" else run_trl)(Path(args.work), args)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        from machine_info import matmul_peak
        peak = matmul_peak("fp32", threads=args.threads)
        results = {side: child(side, work, args) for side in ("llmkit", "trl", "trl", "llmkit")[:2]}
        peak = max(peak, matmul_peak.__wrapped__("fp32", threads=args.threads))  # again after: the best
        flops = model_flops_per_step(work, args)
    import torch
    import transformers
    import trl

    from machine_info import cpu_model
    speed = results["trl"]["step_s"] / results["llmkit"]["step_s"]
    memory = results["trl"]["peak_mib"] / max(results["llmkit"]["peak_mib"], 1e-9)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads"
    lines = ["# llmkit vs TRL: DPO training step", "",
             "- model: Llama 4 layers, hidden 256, 4 heads (2 kv), intermediate 688, BPE vocab 8192; same weights",
             f"- data: HH-RLHF harmless pairs that fit max_length={args.max_length}; batch {args.batch} pairs; "
             "fp32; AdamW; reference = frozen copy",
             f"- machine: {device}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
             f"{datetime.date.today()}",
             f"- method: mean step time over {args.steps} steps after {args.warmup} warmup; peak memory added by training",
             f"- MFU: {flops / 1e9:.1f} GFLOP of model work per step (policy forward + backward 6 N + 12 L d T, "
             "reference forward 2 N + 4 L d T, per real token, the mean over the pairs; the same count for both "
             f"sides) per step time, over this machine's measured fp32 matmul peak, {peak / 1e9:.0f} GFLOP/s "
             "(machine_info.py)",
             f"- command: `.venv/bin/python benchmarks/bench_dpo.py{' --quick' if args.quick else ''}`", "",
             "| metric | llmkit | TRL DPOTrainer | ratio (TRL / llmkit) |", "|---|---:|---:|---:|",
             f"| step time (ms) | {results['llmkit']['step_s'] * 1e3:.1f} | {results['trl']['step_s'] * 1e3:.1f} | {speed:.2f} |",
             f"| MFU | {flops / results['llmkit']['step_s'] / peak:.1%} | {flops / results['trl']['step_s'] / peak:.1%} | |",
             f"| peak memory added (MiB) | {results['llmkit']['peak_mib']:.0f} | {results['trl']['peak_mib']:.0f} | {memory:.2f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (REPO / "benchmarks" / "results" / "dpo.md").write_text(text)


if __name__ == "__main__":
    main()
