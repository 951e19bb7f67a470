"""Compression benchmark (issue 18): every quantization scheme and pruning method of llmkit.compress on
one trained reference model, scored by both quality protocols, with decode speed as a ratio to fp32,
and llama.cpp's own quantizations of the same weights side by side.

Reference model: `recipes/shakespeare_llama_reference.yaml` (a 12.6M-parameter Llama: d 384, 6 layers,
6 heads / 2 KV heads, d_ff 1024, 2048-token BPE) trained by `llmkit pretrain` on tinyshakespeare; the
last 10% of the text (its val split) is the fixed held-out text. It is trained first if
runs/compress_reference/model is missing (~20 min on 2 cores).

Protocols (llmkit.compress.quality; every row names both):
  ppl  non-overlapping 128-token windows of the held-out text, every position scored (pruning papers);
       ΔPPL% = 100 (PPL / PPL_fp32 - 1)
  kld  llama.cpp's perplexity --kl-divergence protocol on the same windows: the second half of each
       window scored, KL(P_fp32 || Q) mean and 99th percentile, same-top-1 rate
Calibration (GPTQ, Wanda, SparseGPT, structured): 128 windows of 128 tokens drawn (seed 0) from the
first 90% of the text, never the held-out tail.

Speed: batch-1 greedy decode with `generate()` (32-token prompt, 128 new tokens), fp32 activations,
torch on --threads threads; every model timed --repeats times in rotation (ABAB...), the median is
reported as tokens/s and as a ratio to fp32 in the same run. Kernels: torch's int8 / int4 weight-pack
CPU matmuls where they apply, else the tiled dequantize fallback; both are timed for int8 and int4.
Structured pruning of 30% of the FFN channels: prefill (one 256-token forward) and decode.

llama.cpp (--llama-cpp-python PYTHON, an environment with llama-cpp-python; never CI): the model
exported by `llmkit export gguf` as f32 / f16 / q8_0 / q4_0, and llama.cpp's own llama_model_quantize of
the f32 file (Q8_0, Q4_0, Q4_K_M), each run in llama.cpp: full-vocabulary logits on the same windows
(scored by the same two protocols against llmkit's fp32 model), and batch-1 decode speed as a ratio
to llama.cpp's f32 file.

Run:  .venv/bin/python benchmarks/bench_compression.py --llama-cpp-python /work/venv-llama/bin/python
      .venv/bin/python benchmarks/bench_compression.py --quick      # a smoke run: few windows, 1 repeat
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from machine_info import machine_line  # noqa: E402

from llmkit.compress import prune, prune_ffn_channels, quantize, save_quantized  # noqa: E402
from llmkit.compress import kernels  # noqa: E402
from llmkit.compress.quality import (heldout_ids, kld_summary, scored_half, token_kld, token_windows,  # noqa: E402
                                     window_log_probs)
from llmkit.compress.quantization import QuantLinear  # noqa: E402
from llmkit.compress.targets import linear_targets  # noqa: E402
from llmkit.generation import generate  # noqa: E402
from llmkit.jobs.artifacts import load_artifacts, save_artifacts  # noqa: E402

TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL_DIR = REPO / "runs" / "compress_reference" / "model"
WINDOW = 128


# ---- the reference and its data ------------------------------------------------------------------
def reference_model():
    if not (MODEL_DIR / "config.json").is_file():
        print("training the reference model (recipes/shakespeare_llama_reference.yaml) ...", flush=True)
        subprocess.run([str(REPO / ".venv" / "bin" / "llmkit"), "pretrain",
                        str(REPO / "recipes" / "shakespeare_llama_reference.yaml")], check=True, cwd=REPO)
    loaded = load_artifacts(MODEL_DIR)
    return loaded.model.float().eval(), loaded.tokenizer


def calibration_windows(tokenizer, samples: int, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    from llmkit.compress_job import CalibrationSection, calibration_windows as draw
    return draw(CalibrationSection(text=str(TEXT), samples=samples, seq_len=seq_len, seed=seed), tokenizer)


class Reference:
    """The fp32 model's log-probabilities on the held-out windows, computed once for every row."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 8):
        self.windows, self.batch_size = windows, batch_size
        self.rows, self.targets = scored_half(windows)                               # kld positions, (W, T/2)
        self.half = []                                                               # per batch (b·T/2, V)
        nll = 0.0
        for i, logp in enumerate(window_log_probs(model, windows, batch_size)):
            w = windows[i * batch_size: i * batch_size + logp.shape[0]]
            nll -= logp[:, :-1].gather(-1, w[:, 1:, None]).double().sum().item()
            self.half.append(logp[:, self.rows].reshape(-1, logp.shape[-1]))
        self.ppl = math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))

    def score(self, model) -> dict:
        """Both protocols for `model` in one pass over the windows."""
        return self.score_logprobs(window_log_probs(model, self.windows, self.batch_size))

    def score_logprobs(self, batches) -> dict:
        nll, parts = 0.0, []
        for i, logp in enumerate(batches):
            s = i * self.batch_size
            w = self.windows[s: s + logp.shape[0]]
            nll -= logp[:, :-1].gather(-1, w[:, 1:, None]).double().sum().item()
            parts.append(token_kld(self.half[i], logp[:, self.rows].reshape(-1, logp.shape[-1]),
                                   self.targets[s: s + logp.shape[0]].reshape(-1)))
        ppl = math.exp(nll / (self.windows.shape[0] * (self.windows.shape[1] - 1)))
        kld = kld_summary(parts)                        # its ppl / delta_ppl are the kld protocol's: kept apart
        kld["kld_ppl"], kld["kld_delta_ppl"] = kld.pop("ppl"), kld.pop("delta_ppl")
        return {**kld, "ppl": ppl, "dppl_pct": 100 * (ppl / self.ppl - 1)}


# ---- sizes -----------------------------------------------------------------------------------------
def block_bits(model) -> float:
    """Stored bits per weight of the block matrices (what compression acts on)."""
    bits = n = 0
    for layer in linear_targets(model).values():
        n += layer.weight.numel()
        bits += 32 * layer.weight.numel()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            n += module.in_features * module.out_features
            bits += 8 * module.nbytes()
    return bits / n


def saved_bytes(model, tokenizer) -> int:
    """Bytes of the weight files the model saves to (safetensors), as on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        if getattr(model, "quantization_config", None):
            save_quantized(model, tmp, tokenizer)
        else:
            save_artifacts(tmp, model, tokenizer, job="bench")
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


def use_tiled(model) -> None:
    """Force the dequantize-per-tile fallback in every QuantLinear (the fast-path comparison)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module._plan = kernels.prepare(module.quantized(), fast=False)


def kernel_of(model) -> str:
    names = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
    return ", ".join(names) if names else "torch fp32 matmul"


# ---- speed -------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_times(models: dict, prompt: torch.Tensor, n_new: int, repeats: int) -> dict:
    """Median seconds per new token of batch-1 greedy generate(), models in rotation."""
    times = {name: [] for name in models}
    for name, model in models.items():                                                # warm-up
        generate(model, prompt, max_new_tokens=4, do_sample=False)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            out = generate(model, prompt, max_new_tokens=n_new, do_sample=False, stop_token_ids=[])
            elapsed = time.perf_counter() - start
            assert out.shape[1] == prompt.shape[1] + n_new, (name, out.shape)
            times[name].append(elapsed / n_new)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def prefill_times(models: dict, ids: torch.Tensor, repeats: int) -> dict:
    times = {name: [] for name in models}
    for model in models.values():
        model(ids)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- the rows ------------------------------------------------------------------------------------------
QUANT_ROWS = [  # label, scheme, options
    ("int8 (per channel, RTN)", "int8", {}),
    ("int4 g128 sym RTN", "int4", {"group_size": 128}),
    ("int4 g128 asym RTN", "int4", {"group_size": 128, "symmetric": False}),
    ("int4 g128 sym GPTQ", "int4", {"group_size": 128, "method": "gptq"}),
    ("int4 g32 asym GPTQ", "int4", {"group_size": 32, "symmetric": False, "method": "gptq"}),
    ("int3 g64 asym RTN", "int3", {"group_size": 64, "symmetric": False}),
    ("int3 g64 asym GPTQ", "int3", {"group_size": 64, "symmetric": False, "method": "gptq"}),
    ("NF4 (blocks of 64)", "nf4", {}),
    ("NF4 + double quant", "nf4", {"double_quant": True}),
    ("W8A8 (dynamic per-token activations)", "w8a8", {}),
]
PRUNE_ROWS = [(m, s, nm) for m in ("magnitude", "wanda", "sparsegpt") for s, nm in ((0.5, None), (0.5, "2:4"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--windows", type=int, default=None, help="held-out windows scored (default: all)")
    ap.add_argument("--llama-cpp-python", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 1 if args.quick else args.repeats
    out_path = Path(args.out or ("/tmp/bench_compression_quick.md" if args.quick
                                 else REPO / "benchmarks" / "results" / "compression.md"))

    base, tokenizer = reference_model()
    ids = heldout_ids(TEXT.read_text(encoding="utf-8"), tokenizer, 0.1)
    windows = token_windows(ids, WINDOW, 16 if args.quick else args.windows)                   # (W, 128)
    calibration = calibration_windows(tokenizer, 16 if args.quick else args.calibration)
    ref = Reference(base, windows)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"reference: {n_params / 1e6:.2f}M parameters, held-out {ids.numel()} tokens, {windows.shape[0]} windows, "
          f"fp32 PPL {ref.ppl:.3f}", flush=True)
    fp32_bytes = saved_bytes(base, tokenizer)

    # 1. quantization ------------------------------------------------------------------------------------
    quant, models = [], {"fp32": base}
    for label, scheme, options in QUANT_ROWS:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize(model, scheme, calibration=calibration, progress=False, **options)
        seconds = time.perf_counter() - start
        row = {"label": label, "seconds": seconds, "bits": block_bits(model), "bytes": saved_bytes(model, tokenizer),
               "kernel": kernel_of(model), **ref.score(model)}
        quant.append(row)
        models[label] = model
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    bf16_row = {"label": "bf16 weights", "bits": 16.0, "bytes": saved_bytes(bf16, tokenizer),
                "kernel": "torch bf16 matmul", **ref.score(bf16)}

    # speed: fp32, bf16, one model per scheme, the tiled fallback for int8 and int4
    timed = {"fp32": base, "bf16 weights": bf16}
    timed.update({label: models[label] for label in ("int8 (per channel, RTN)", "int4 g128 sym RTN",
                                                    "int3 g64 asym RTN", "NF4 (blocks of 64)",
                                                    "W8A8 (dynamic per-token activations)")})
    for label in ("int8 (per channel, RTN)", "int4 g128 sym RTN"):
        tiled = copy.deepcopy(models[label])
        use_tiled(tiled)
        timed[f"{label}, tiled fallback"] = tiled
    prompt = windows[0:1, :32]
    decode = decode_times(timed, prompt, 16 if args.quick else 128, repeats)
    print("decode s/token:", json.dumps(decode), flush=True)

    # 2. pruning ------------------------------------------------------------------------------------------
    pruned = []
    for method, sparsity, n_m in PRUNE_ROWS:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = prune(model, method, sparsity, n_m=n_m, calibration=calibration, progress=False)
        row = {"method": method, "pattern": n_m or f"{sparsity:.0%} unstructured", "sparsity": report["sparsity"],
               "seconds": time.perf_counter() - start, **ref.score(model)}
        pruned.append(row)
        print(json.dumps(row), flush=True)

    # 3. structured: 30% of the FFN channels --------------------------------------------------------------
    ffn = copy.deepcopy(base)
    ffn_report = prune_ffn_channels(ffn, 0.3, calibration=calibration)
    ffn_row = {"params": sum(p.numel() for p in ffn.parameters()), "d_ff": ffn.config.d_ff, **ref.score(ffn)}
    long = ids[: 256].unsqueeze(0)
    prefill = prefill_times({"fp32": base, "ffn-30%": ffn}, long, max(repeats, 5))
    ffn_decode = decode_times({"fp32": base, "ffn-30%": ffn}, prompt, 16 if args.quick else 128, repeats)
    print("structured:", json.dumps({**ffn_row, "prefill": prefill, "decode": ffn_decode}), flush=True)

    # 4. llama.cpp -----------------------------------------------------------------------------------------
    llama = llama_cpp_rows(base, tokenizer, ref, windows, prompt, args) if args.llama_cpp_python else None

    text = render(args, n_params, ids, windows, ref, fp32_bytes, quant, bf16_row, decode, pruned,
                  ffn_report, ffn_row, prefill, ffn_decode, llama)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)
    print(f"wrote {out_path}")
    return 0


def llama_cpp_rows(base, tokenizer, ref: Reference, windows, prompt, args) -> dict:
    """llmkit's GGUF exports and llama.cpp's own quantizations, run in llama.cpp."""
    import llama_cpp_check as lc
    from llmkit.export.gguf import export_gguf, gguf_bits_per_weight
    work = Path(tempfile.mkdtemp(prefix="bench_compression_gguf_"))
    files = {f"llmkit export {t}": export_gguf(base, work / f"ours-{t}.gguf", type=t, tokenizer=tokenizer)
             for t in ("f32", "f16", "q8_0", "q4_0")}
    for q in ("Q8_0", "Q4_0", "Q4_K_M"):
        files[f"llama.cpp quantize {q}"] = lc.llama_quantize(files["llmkit export f32"], work / f"llama-{q}.gguf", q,
                                                             args.llama_cpp_python, args.threads)
    rows, wins = [], windows.tolist()
    for label, path in files.items():
        code, tokens, logits, err = lc.run_llama(path, prompt[0].tolist(), 16, wins, args.llama_cpp_python,
                                                 args.threads)
        row = {"label": label, "bytes": path.stat().st_size, "bits": gguf_bits_per_weight(path), "exit": code}
        if logits is None:
            row["error"] = err.splitlines()[-1] if err else "no logits"
        else:
            logp = torch.log_softmax(torch.from_numpy(logits).float(), -1)             # (W, T, V)
            row.update(ref.score_logprobs(logp[i: i + ref.batch_size] for i in range(0, len(wins), ref.batch_size)))
            row["tokens"] = tokens
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    llmkit_tokens = generate(base, prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:].tolist()
    speed = llama_decode(files, prompt[0].tolist(), 16 if args.quick else 128, 1 if args.quick else args.repeats,
                         args)
    return {"rows": rows, "llmkit_tokens": llmkit_tokens, "speed": speed}


def llama_decode(files: dict, prompt: list, n: int, repeats: int, args) -> dict:
    """Median seconds per token of llama.cpp's batch-1 greedy decode for each file (benchmarks/llama_cpp_worker.py)."""
    worker = REPO / "benchmarks" / "llama_cpp_worker.py"
    out = {}
    for label, path in files.items():
        proc = subprocess.run([args.llama_cpp_python, str(worker), str(path),
                               json.dumps({"prompt": prompt, "n": n, "threads": args.threads, "repeats": repeats})],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            out[label] = None
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out[label] = statistics.median(result["times"]) / n
    return out


# ---- the report -------------------------------------------------------------------------------------------
def render(args, n_params, ids, windows, ref, fp32_bytes, quant, bf16_row, decode, pruned, ffn_report, ffn_row,
           prefill, ffn_decode, llama) -> str:
    def tps(label):
        return 1 / decode[label] if label in decode else None

    def ratio(label):
        return f"{decode['fp32'] / decode[label]:.2f}x" if label in decode else "-"

    L = [f"# Compression benchmark ({datetime.date.today().isoformat()})", "",
         f"Machine: {machine_line()}, torch threads {args.threads}.", "",
         f"Reference: `recipes/shakespeare_llama_reference.yaml`, {n_params / 1e6:.2f}M parameters (Llama: d 384, "
         f"6 layers, 6 heads / 2 KV heads, d_ff 1024, 2048-token BPE), trained by `llmkit pretrain`. Held-out text: "
         f"the last 10% of tinyshakespeare, {ids.numel()} tokens, {windows.shape[0]} windows of {WINDOW}. "
         f"Calibration: {args.calibration if not args.quick else 16} windows of 128 tokens from the first 90%.", "",
         "Protocols (both in every row):",
         f"- **ppl**: non-overlapping {WINDOW}-token windows, every position scored (the pruning papers). "
         f"fp32 PPL = {ref.ppl:.3f}; ΔPPL% = 100 (PPL / PPL_fp32 − 1).",
         f"- **kld**: llama.cpp's `perplexity --kl-divergence` protocol on the same windows, the second half of each "
         f"scored: KL(P_fp32 ‖ Q) mean and 99th percentile, same-top-1 = argmax agreement.", "",
         f"Decode: batch-1 greedy `generate()`, 32-token prompt, {128 if not args.quick else 16} new tokens, median "
         f"of {1 if args.quick else args.repeats} rotations; fp32 decodes at {tps('fp32'):.1f} tokens/s.", "",
         "## Quantization (weight-only; embeddings and the output head stay fp32)", "",
         "| scheme | bits / weight (block matrices) | weight bytes | ΔPPL % (ppl) | KLD mean (kld) | KLD p99 | same top-1 | decode ÷ fp32 | kernel | seconds |",
         "|---|---|---|---|---|---|---|---|---|---|",
         f"| fp32 | 32.0 | {fp32_bytes:,} | 0 | 0 | 0 | 1.000 | 1.00x | torch fp32 matmul | - |",
         f"| bf16 weights | 16.0 | {bf16_row['bytes']:,} | {bf16_row['dppl_pct']:+.3f} | {bf16_row['kld_mean']:.2e} | "
         f"{bf16_row['kld_p99']:.2e} | {bf16_row['same_top1']:.3f} | {ratio('bf16 weights')} | {bf16_row['kernel']} | - |"]
    for r in quant:
        L.append(f"| {r['label']} | {r['bits']:.3f} | {r['bytes']:,} | {r['dppl_pct']:+.3f} | {r['kld_mean']:.2e} | "
                 f"{r['kld_p99']:.2e} | {r['same_top1']:.3f} | {ratio(r['label'])} | {r['kernel']} | {r['seconds']:.1f} |")
    L += ["", "Fast kernels against the tiled dequantize fallback (decode ÷ fp32):", ""]
    for label in ("int8 (per channel, RTN)", "int4 g128 sym RTN"):
        L.append(f"- {label}: fast {ratio(label)}, tiled fallback {ratio(label + ', tiled fallback')}")
    L += ["", "## Pruning (unstructured 50% and 2:4, every block matrix)", "",
          "| method | pattern | sparsity | PPL (ppl) | ΔPPL % | KLD mean (kld) | same top-1 | seconds |",
          "|---|---|---|---|---|---|---|---|",
          f"| none (fp32) | - | 0 | {ref.ppl:.3f} | 0 | 0 | 1.000 | - |"]
    for r in pruned:
        L.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.4f} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} | "
                 f"{r['kld_mean']:.4f} | {r['same_top1']:.3f} | {r['seconds']:.1f} |")
    L += ["", "## Structured: 30% of every layer's FFN channels removed (calibrated importance)", "",
          f"d_ff 1024 → {ffn_row['d_ff']}, parameters {n_params:,} → {ffn_row['params']:,}; PPL {ffn_row['ppl']:.3f} "
          f"(ΔPPL {ffn_row['dppl_pct']:+.1f}%), KLD {ffn_row['kld_mean']:.4f}, same top-1 {ffn_row['same_top1']:.3f}.", "",
          "| | fp32 | FFN −30% | speed-up |", "|---|---|---|---|",
          f"| prefill, 256 tokens (ms) | {1e3 * prefill['fp32']:.1f} | {1e3 * prefill['ffn-30%']:.1f} | "
          f"{prefill['fp32'] / prefill['ffn-30%']:.2f}x |",
          f"| decode (ms / token) | {1e3 * ffn_decode['fp32']:.2f} | {1e3 * ffn_decode['ffn-30%']:.2f} | "
          f"{ffn_decode['fp32'] / ffn_decode['ffn-30%']:.2f}x |"]
    if llama is not None:
        speed = llama["speed"]
        base_speed = speed.get("llmkit export f32")
        L += ["", "## llama.cpp: llmkit's GGUF exports and llama.cpp's own quantizations of the same weights", "",
              "Each file run in llama.cpp (llama-cpp-python); its logits scored by both protocols against llmkit's "
              "fp32 model. Decode: llama.cpp batch-1 greedy, ratio to its f32 file.", "",
              f"llmkit fp32 greedy (16 tokens): {llama['llmkit_tokens']}", "",
              "| file | bits / weight (file) | bytes | loads | greedy == llmkit fp32 | ΔPPL % (ppl) | KLD mean (kld) | KLD p99 | same top-1 | decode ÷ llama.cpp f32 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in llama["rows"]:
            s = speed.get(r["label"])
            sp = f"{base_speed / s:.2f}x" if s and base_speed else "-"
            if "error" in r:
                L.append(f"| {r['label']} | {r['bits']:.3f} | {r['bytes']:,} | no (exit {r['exit']}: {r['error']}) "
                         f"| - | - | - | - | - | {sp} |")
            else:
                L.append(f"| {r['label']} | {r['bits']:.3f} | {r['bytes']:,} | yes | "
                         f"{'yes' if r['tokens'] == llama['llmkit_tokens'] else 'no'} | {r['dppl_pct']:+.3f} | "
                         f"{r['kld_mean']:.2e} | {r['kld_p99']:.2e} | {r['same_top1']:.3f} | {sp} |")
        if base_speed:
            L.append(f"\nllama.cpp f32 decodes at {1 / base_speed:.1f} tokens/s against llmkit fp32's "
                     f"{tps('fp32'):.1f} (different harnesses: its own generate loop vs `generate()`).")
    int8 = next(r for r in quant if r["label"].startswith("int8"))
    gptq4 = next(r for r in quant if r["label"] == "int4 g128 sym GPTQ")
    half = {r["method"]: r for r in pruned if r["pattern"].endswith("unstructured")}
    L += ["", "## Goals", "",
          f"- int8 ΔPPL ≤ 0.1%: {int8['dppl_pct']:+.3f}% — {'met' if abs(int8['dppl_pct']) <= 0.1 else 'missed'}",
          f"- int4 (GPTQ, g128) ΔPPL ≤ 3%: {gptq4['dppl_pct']:+.2f}% — {'met' if gptq4['dppl_pct'] <= 3 else 'missed'}",
          f"- int8 decode ≥ 1.3× fp32: {decode['fp32'] / decode[int8['label']]:.2f}× — "
          f"{'met' if decode['fp32'] / decode[int8['label']] >= 1.3 else 'missed'}",
          f"- Wanda and SparseGPT below magnitude at 50%: PPL magnitude {half['magnitude']['ppl']:.3f}, "
          f"Wanda {half['wanda']['ppl']:.3f}, SparseGPT {half['sparsegpt']['ppl']:.3f} — "
          f"{'met' if max(half['wanda']['ppl'], half['sparsegpt']['ppl']) < half['magnitude']['ppl'] else 'missed'}"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
