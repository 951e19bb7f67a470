"""Core benchmark: llmkit vs Hugging Face transformers on the same small Llama, same weights.

What it measures, for an MHA config (6 layers, d=384, 6 heads) and a GQA one (2 kv heads):
  - train step: forward + cross-entropy on shifted ids + backward, grads zeroed between steps
    (batch 8 x seq 128 by default; fp32, plus a bf16-autocast row where the CPU supports it);
  - generate: greedy decoding through the KV cache, prompt 32 tokens, exactly 128 new tokens
    (no stop token), batch 1 and batch 4, as tokens/s.
Both models are loaded from one `save_pretrained` folder (transformers with attn "sdpa", llmkit
with `llmkit.load_hf`); their logits must agree to 1e-4 and their greedy tokens must be identical.
Runs are interleaved (ABBA: llmkit, HF, HF, llmkit, ...) after warmup, so machine noise hits
both; each number is the median over --reps. ratio > 1 means llmkit is faster:
transformers_time / llmkit_time for step time, llmkit_tps / hf_tps for throughput.

Run:  make bench                       (= .venv/bin/python benchmarks/bench_core.py)
      .venv/bin/python benchmarks/bench_core.py --reps 10 --write   (writes results/core.md)
      .venv/bin/python benchmarks/bench_core.py --quick            (tiny smoke run, seconds)
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from machine_info import cpu_model, matmul_peak, mfu, train_flops_per_token

import llmkit
from llmkit.generation import generate as llmkit_generate

transformers.utils.logging.disable_progress_bar()

THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "core.md"
FULL = dict(layers=6, hidden=384, heads=6, inter=1024, vocab=8192, positions=1024,
            batch=8, seq=128, prompt=32, new=128)
QUICK = dict(layers=2, hidden=64, heads=4, inter=128, vocab=512, positions=256,
             batch=2, seq=32, prompt=8, new=16)


def build_pair(size: dict, kv_heads: int, folder: Path):
    """A seeded transformers Llama saved to `folder`, and both libraries' models read from it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=kv_heads, max_position_embeddings=size["positions"],
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    hf = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    hf.generation_config.eos_token_id = None   # nothing may stop decoding early
    ours = llmkit.load_hf(folder)
    return ours.eval(), hf.eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits                                                        # (B, T, V)


def train_step(model, ids: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = logits_of(model, ids)                                              # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def gen_ours(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return llmkit_generate(model, ids, max_new_tokens=n, do_sample=False, stop_token_ids=[])


def gen_hf(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fn_ours, fn_hf, reps: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of each, alternating ABBA so drift and order effects hit both equally."""
    for _ in range(warmup):
        fn_ours(), fn_hf()
    ours, hf = [], []
    for rep in range(reps):
        pair = [(fn_ours, ours), (fn_hf, hf)]
        for fn, out in (pair if rep % 2 == 0 else pair[::-1]):
            out.append(timed(fn))
    return statistics.median(ours), statistics.median(hf)


def bf16_supported(ours, hf, ids: torch.Tensor) -> bool:
    try:
        for model in (ours, hf):
            train_step(model, ids[:1, :8], bf16=True)
        return True
    except (RuntimeError, NotImplementedError) as err:
        print(f"  bf16 autocast skipped: {err}")
        return False


def bench_config(name: str, size: dict, kv_heads: int, reps: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_pair(size, kv_heads, Path(tmp))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(size["vocab"], (size["batch"], size["seq"]), generator=gen)
    with torch.no_grad():
        diff = (logits_of(ours, ids) - logits_of(hf, ids)).abs().max().item()
    print(f"[{name}] max |logits_llmkit - logits_hf| = {diff:.2e}")
    assert diff <= 1e-4, f"{name}: logits differ by {diff:.2e} > 1e-4; timings would be meaningless"
    rows.append((f"{name}: max abs logits diff", f"{diff:.1e}", "", "", ""))

    ours.train(), hf.train()
    tokens = size["batch"] * size["seq"]
    # N: parameters that multiply (the untied lm_head counts, the embedding lookup does not)
    n_matmul = sum(p.numel() for p in hf.parameters()) - hf.model.embed_tokens.weight.numel()
    per_token = train_flops_per_token(n_matmul, size["layers"], size["hidden"], size["seq"])
    dtypes = [False] + ([True] if bf16_supported(ours, hf, ids) else [])
    for bf16 in dtypes:
        t_ours, t_hf = interleaved(lambda: train_step(ours, ids, bf16), lambda: train_step(hf, ids, bf16), reps)
        label = f"{name}: train step B{size['batch']}xT{size['seq']} {'bf16 autocast' if bf16 else 'fp32'} (ms)"
        print(f"  {label}: llmkit {t_ours * 1e3:.1f}  hf {t_hf * 1e3:.1f}  ({tokens} tokens)")
        # MFU is filled in by main() once the peak has been measured again after all timing
        util = ("bf16" if bf16 else "fp32", [per_token * tokens / t for t in (t_ours, t_hf)])
        rows.append((label, f"{t_ours * 1e3:.1f}", f"{t_hf * 1e3:.1f}", f"{t_hf / t_ours:.2f}", util))
    ours.eval(), hf.eval()

    n = size["new"]
    for batch in (1, 4):
        prompt = torch.randint(size["vocab"], (batch, size["prompt"]), generator=gen)
        with torch.no_grad():
            same = torch.equal(gen_ours(ours, prompt, n), gen_hf(hf, prompt, n))
        print(f"  generate B{batch}: tokens identical = {same}")
        assert same, f"{name}: greedy tokens differ between llmkit and transformers (batch {batch})"
        t_ours, t_hf = interleaved(lambda: gen_ours(ours, prompt, n),
                                   lambda: gen_hf(hf, prompt, n), reps)
        tps_ours, tps_hf = batch * n / t_ours, batch * n / t_hf
        label = f"{name}: generate B{batch} prompt {size['prompt']} + {n} new (tokens/s)"
        print(f"  {label}: llmkit {tps_ours:.0f}  hf {tps_hf:.0f}")
        rows.append((label, f"{tps_ours:.0f}", f"{tps_hf:.0f}", f"{tps_ours / tps_hf:.2f}", ""))
    return rows


def with_mfu(rows: list[tuple], peaks: dict) -> list[tuple]:
    """Rows whose last field is (dtype, [llmkit FLOP/s, hf FLOP/s]) get it as 'llmkit% / hf%'."""
    def cell(util):
        if not util:
            return ""
        dtype, achieved = util
        return " / ".join(f"{mfu(1.0, f, peaks[dtype]):.1%}" for f in achieved)
    return [(*row[:4], cell(row[4])) for row in rows]


def table(rows: list[tuple], size: dict, reps: int, quick: bool, peaks: dict) -> str:
    cfg = (f"Llama {size['layers']} layers, hidden {size['hidden']}, {size['heads']} heads, "
           f"intermediate {size['inter']}, vocab {size['vocab']}, max positions {size['positions']}")
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
               f"{datetime.date.today().isoformat()}")
    lines = [
        "# llmkit vs transformers: core benchmark" + (" (QUICK smoke run)" if quick else ""), "",
        f"- model: {cfg}; MHA = {size['heads']} kv heads, GQA = 2 kv heads; same weights",
        f"- machine: {machine}",
        f"- method: median of {reps} interleaved repetitions (ABBA) after warmup; "
        "ratio > 1 means llmkit is faster (hf_time / llmkit_time, llmkit_tps / hf_tps)",
        f"- MFU (train steps, llmkit / transformers): (6 N + 12 L d T) x tokens/s over this machine's "
        f"measured matmul peak in the step's dtype (machine_info.py): fp32 "
        f"{peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s (best of before and after the "
        f"timing); N = the parameters that multiply (all but the embedding table)",
        f"- command: `.venv/bin/python benchmarks/bench_core.py {' '.join(sys.argv[1:])}`", "",
        "| metric | llmkit | transformers | ratio | MFU |", "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {m} | {a} | {b} | {r} | {u} |" for m, a, b, r, u in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per metric (default 10, quick 3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--write", action="store_true", help=f"write the table to {RESULTS}")
    parser.add_argument("--no-gqa", action="store_true", help="skip the second (GQA) config")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    size = QUICK if args.quick else FULL
    reps = args.reps or (3 if args.quick else 10)
    peaks = {d: matmul_peak(d, threads=THREADS) for d in ("fp32", "bf16")}   # before any timing

    rows = bench_config("MHA", size, size["heads"], reps)
    if not args.no_gqa:
        rows += bench_config("GQA", size, 2, reps)
    # again after the timing: a busy moment only lowers a measured peak (and would inflate MFU)
    peaks = {d: max(p, matmul_peak.__wrapped__(d, threads=THREADS)) for d, p in peaks.items()}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    text = table(with_mfu(rows, peaks), size, reps, args.quick, peaks)
    print("\n" + text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
