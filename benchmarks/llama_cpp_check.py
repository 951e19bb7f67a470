"""Check `llmkit export gguf` against llama.cpp itself (llama-cpp-python, in its own environment).

    python benchmarks/llama_cpp_check.py MODEL_DIR [--text FILE [--held-out 0.1]] [--python /work/venv-llama/bin/python]
    python benchmarks/llama_cpp_check.py --random d_model=64,d_ff=128,n_layers=2,n_heads=4,n_kv_heads=2,vocab_size=256

1. exports MODEL_DIR (or a seeded random Llama) as f32, f16, q8_0 and q4_0 GGUF files;
2. quantizes the f32 file with llama.cpp's own llama_model_quantize (Q8_0, Q4_0, Q4_K_M by default);
3. loads every file in llama.cpp (one process per file, benchmarks/llama_cpp_logits_worker.py, so a
   crash is reported, not fatal) and reads the greedy continuation of a fixed prompt and the
   full-vocabulary logits at every position of fixed token windows;
4. compares with llmkit's fp32 model: the greedy continuation of the f32 file must equal llmkit's
   `generate()` greedy, and for every file the KL divergence of its next-token distribution to llmkit's
   (llama.cpp's perplexity --kl-divergence protocol, here on the given windows):
       KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)),  P = softmax(llmkit fp32 logits), Q = the file's
   mean and max over positions, and the same-top-1 rate.
It also lists, for our q8_0 / q4_0 files, how their general.file_type, tensor types, shapes and bytes
differ from what llama_model_quantize writes from the same f32 file.

The functions are the reusable core (the compression benchmark calls `check_model`); nothing here runs
in CI: the llama.cpp environment is a separate interpreter, `--python` or $LLMKIT_LLAMA_CPP_PYTHON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmkit.export.gguf import GGUF_TYPES, export_gguf, gguf_bits_per_weight

WORKER = Path(__file__).with_name("llama_cpp_logits_worker.py")
DEFAULT_PYTHON = os.environ.get("LLMKIT_LLAMA_CPP_PYTHON", "/work/venv-llama/bin/python")
LLAMA_QUANTS = ("Q8_0", "Q4_0", "Q4_K_M")


@dataclass
class FileResult:
    label: str                              # "ours f32", "llama.cpp Q4_K_M", ...
    path: Path
    size: int
    bits_per_weight: float
    returncode: int = 0                     # the worker's exit status (-11: llama.cpp segfaulted)
    error: str = ""
    tokens: list = field(default_factory=list)
    same_tokenization: Optional[bool] = None  # llama.cpp's tokenization of the text == llmkit's
    kld_mean: float = float("nan")
    kld_max: float = float("nan")
    same_top1: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.error


# ---- llama.cpp, through the worker -------------------------------------------------------------
def _worker(python: str, mode: str, path: Path, spec: dict, timeout: float) -> tuple[int, dict, str]:
    proc = subprocess.run([python, str(WORKER), mode, str(path), json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
    return proc.returncode, result, proc.stderr.strip()[-2000:]


def llama_quantize(src: Path, dst: Path, ftype: str, python: str = DEFAULT_PYTHON, threads: int = 2,
                   timeout: float = 600) -> Path:
    """llama.cpp's own quantization of `src` (an f32 GGUF) to `dst`; ftype as in LLAMA_FTYPE_MOSTLY_*."""
    code, result, err = _worker(python, "quantize", src, {"out": str(dst), "ftype": ftype, "threads": threads},
                                timeout)
    if code != 0 or result.get("status") != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype}: exit {code}, {result}, {err}")
    return dst


def run_llama(path: Path, prompt: list, n_new: int, windows: list, python: str = DEFAULT_PYTHON,
              threads: int = 2, timeout: float = 600, text: Optional[str] = None) -> tuple[int, dict, Optional[np.ndarray], str]:
    """(exit status, worker result (greedy "tokens", "text_ids"), logits (windows, T, V) or None, stderr)
    of llama.cpp on one file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        spec = {"prompt": prompt, "n": n_new, "windows": windows, "threads": threads, "logits_out": str(out),
                "text": text}
        code, result, err = _worker(python, "run", path, spec, timeout)
        logits = np.load(out) if code == 0 and out.is_file() else None
    return code, result, logits, err


# ---- llmkit's side ------------------------------------------------------------------------------
@torch.no_grad()
def reference(model, prompt: list, n_new: int, windows: list) -> tuple[list, np.ndarray]:
    """llmkit's fp32 greedy continuation of `prompt` and its logits (windows, T, V) on `windows`."""
    from llmkit.generation import generate
    model = model.float().eval()
    seq = generate(model, torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)
    logits = torch.stack([model(torch.tensor([w])).logits[0] for w in windows])          # (W, T, V)
    return seq[0, len(prompt):].tolist(), logits.numpy()


def kl_to_reference(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """KL(P_ref || Q) per position (float64), its mean and max, and the same-top-1 rate."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    logp, logq = log_softmax(ref_logits), log_softmax(logits)                            # (W, T, V)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)                                          # (W, T)
    same = (ref_logits.argmax(-1) == logits.argmax(-1)).mean()
    return {"kld_mean": float(kl.mean()), "kld_max": float(kl.max()), "same_top1": float(same)}


# ---- file structure -----------------------------------------------------------------------------
def gguf_layout(path: Path) -> tuple[int, dict]:
    """(general.file_type, {tensor name: (GGML type name, shape, data bytes)})."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    ftype = int(reader.fields["general.file_type"].parts[-1][0])
    return ftype, {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), t.data.tobytes())
                   for t in reader.tensors}


def diff_layouts(ours: Path, theirs: Path) -> list:
    """Lines saying where two GGUF files differ in file_type, tensor names, types, shapes and bytes.
    The order of the tensors is not compared: llama_model_quantize writes them sorted by name."""
    (fa, ta), (fb, tb) = gguf_layout(ours), gguf_layout(theirs)
    lines = [f"general.file_type {fa} vs {fb}"] if fa != fb else []
    lines += [f"{name}: only in {'ours' if name in ta else 'theirs'}" for name in sorted(set(ta) ^ set(tb))]
    same = [name for name in ta if name in tb and ta[name] == tb[name]]
    lines += [f"{name}: {ta[name][0]} {ta[name][1]} vs {tb[name][0]} {tb[name][1]}" for name in ta
              if name in tb and ta[name][:2] != tb[name][:2]]
    lines += [f"{name}: same type and shape, other bytes" for name in ta
              if name in tb and ta[name][:2] == tb[name][:2] and ta[name] != tb[name]]
    return lines + [f"{len(same)}/{len(ta)} tensors byte-identical"]


# ---- the check ----------------------------------------------------------------------------------
def check_model(model, tokenizer, workdir: Path, prompt: list, windows: list, n_new: int = 16,
                types=GGUF_TYPES, llama_quants=LLAMA_QUANTS, python: str = DEFAULT_PYTHON,
                threads: int = 2, text: Optional[str] = None) -> dict:
    """Export, quantize with llama.cpp, run every file there, compare with llmkit (with `text` and a
    tokenizer, also llama.cpp's tokenization of `text` with llmkit's).

    Returns {"reference_tokens", "results": [FileResult], "diffs": {type: [lines]}}.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {f"ours {t}": export_gguf(model, workdir / f"ours-{t}.gguf", type=t, tokenizer=tokenizer)
             for t in types}
    diffs = {}
    if "f32" in types:
        for q in llama_quants:
            dst = llama_quantize(files["ours f32"], workdir / f"llama-{q}.gguf", q, python, threads)
            files[f"llama.cpp {q}"] = dst
            if q.lower() in types:
                diffs[q.lower()] = diff_layouts(files[f"ours {q.lower()}"], dst)
    ref_tokens, ref_logits = reference(model, prompt, n_new, windows)
    results = []
    for label, path in files.items():
        r = FileResult(label, path, path.stat().st_size, gguf_bits_per_weight(path))
        text = text if tokenizer is not None else None
        r.returncode, out, logits, err = run_llama(path, prompt, n_new, windows, python, threads, text=text)
        r.tokens = out.get("tokens", [])
        if text is not None and r.returncode == 0:
            r.same_tokenization = out.get("text_ids") == tokenizer.encode(text)
        if logits is None:
            r.error = err.splitlines()[-1] if err else "no logits"
        else:
            for key, value in kl_to_reference(ref_logits, logits).items():
                setattr(r, key, value)
        results.append(r)
    return {"reference_tokens": ref_tokens, "results": results, "diffs": diffs}


def format_report(report: dict) -> str:
    lines = [f"llmkit fp32 greedy: {report['reference_tokens']}", "",
             "| file | size (bytes) | bits/weight | loads | greedy == llmkit | KLD mean | KLD max | same top-1 "
             "| tokenizes as llmkit |", "|---|---:|---:|---|---|---:|---:|---:|---|"]
    for r in report["results"]:
        loads = "yes" if r.ok else f"no (exit {r.returncode}: {r.error})"
        same = _yes_no(r.tokens == report["reference_tokens"])
        lines.append(f"| {r.label} | {r.size} | {r.bits_per_weight:.3f} | {loads} | {same} | {r.kld_mean:.2e} | "
                     f"{r.kld_max:.2e} | {r.same_top1:.3f} | {_yes_no(r.same_tokenization)} |")
    lines += ["", "greedy continuations:"] + [f"  {r.label}: {r.tokens}" for r in report["results"]]
    for kind, diff in report["diffs"].items():
        lines.append(f"ours {kind} vs llama.cpp's {kind.upper()} of the same f32 file: "
                     + "; ".join(diff))
    return "\n".join(lines)


def _yes_no(flag: Optional[bool]) -> str:
    return "-" if flag is None else "yes" if flag else "no"


def random_llama(spec: str, seed: int = 0):
    """A seeded random Llama from 'key=value,...' ModelConfig fields (defaults: llama-tiny)."""
    import llmkit
    fields = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
    torch.manual_seed(seed)
    config = llmkit.get_preset("llama-tiny", **{"max_seq_len": 128, **fields})
    return llmkit.build_model(config).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a model folder (save_artifacts output or checkpoint)")
    parser.add_argument("--random", help="instead: a random Llama, 'd_model=64,n_layers=2,...'")
    parser.add_argument("--text", help="a text file to cut the windows from (default: seeded random ids)")
    parser.add_argument("--held-out", type=float, default=0.0,
                        help="cut them from the last fraction of its tokens (0.1: the reference model's held-out text)")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="an interpreter with llama_cpp")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-len", type=int, default=64)
    parser.add_argument("--n-new", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quants", default=",".join(LLAMA_QUANTS), help="llama.cpp ftypes ('' for none)")
    parser.add_argument("--out-dir", help="keep the GGUF files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.random is not None:
        model, tokenizer = random_llama(args.random), None
    else:
        from llmkit.jobs.artifacts import load_artifacts
        artifacts = load_artifacts(args.model)
        model, tokenizer = artifacts.model, artifacts.tokenizer
    vocab = model.config.vocab_size
    text = None
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
        ids = tokenizer.encode(text)
        ids = ids[len(ids) - int(len(ids) * args.held_out):] if args.held_out else ids
        windows = [ids[i * args.window_len:(i + 1) * args.window_len] for i in range(args.windows)]
    else:
        gen = torch.Generator().manual_seed(1)
        windows = torch.randint(0, vocab, (args.windows, args.window_len), generator=gen).tolist()
    prompt = windows[0][:8]
    with tempfile.TemporaryDirectory() as tmp:
        report = check_model(model, tokenizer, Path(args.out_dir or tmp), prompt, windows, args.n_new,
                             llama_quants=tuple(q for q in args.quants.split(",") if q), python=args.python,
                             threads=args.threads, text=text[-20000:] if text else None)
        print(format_report(report))
    ok = all(r.ok and r.same_tokenization is not False for r in report["results"])
    f32 = next((r for r in report["results"] if r.label == "ours f32"), None)
    return 0 if ok and (f32 is None or f32.tokens == report["reference_tokens"]) else 1


if __name__ == "__main__":
    sys.exit(main())
