"""`llmkit compress recipe.yaml [key=value ...]`: prune and / or quantize a saved model, then score it.

    model: runs/compress_reference/model      # any model folder load_artifacts reads
    out: runs/compressed/int4_gptq
    prune:      {method: magnitude | wanda | sparsegpt, sparsity: 0.5, n_m: "2:4" | null}
    structured: {ffn_fraction: 0.3, head_fraction: 0.0}    # really removes FFN channels / KV groups
    quantize:   {scheme: int8 | int4 | int3 | nf4 | w8a8, group_size: 128, symmetric: true, method: rtn | gptq}
    calibration: {text: FILE, samples: 128, seq_len: 128, heldout_fraction: 0.1, seed: 0}
    eval:       {text: FILE, window: 128, heldout_fraction: 0.1, max_windows: null}   # optional

The steps run in that order (structured, then unstructured pruning, then quantization: SparseGPT's
joint 2:4 + 4-bit setting). Calibration windows are drawn (seeded) from the text before its held-out
tail, so the text that `eval` scores is never calibrated on. The out folder holds the model (a
quantized one in llmkit's quantized safetensors layout, otherwise the usual HF folder), its
tokenizer and `compression_report.json`: the steps, bits per weight, bytes, sparsity, seconds and,
with `eval`, both quality protocols against the input model.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .io.safetensors_files import atomic_write_text
from .jobs.artifacts import load_artifacts, save_artifacts
from .recipes import RecipeError


@dataclass
class PruneSection:
    method: str = "magnitude"           # magnitude | wanda | sparsegpt
    sparsity: float = 0.5               # in [0, 1); with n_m it is implied (N/M)
    n_m: Optional[str] = None           # "2:4": N zeros in every M consecutive inputs


@dataclass
class StructuredSection:
    ffn_fraction: float = 0.0           # share of FFN channels removed (the same count in every layer)
    head_fraction: float = 0.0          # share of KV-head groups removed


@dataclass
class QuantizeSection:
    scheme: str = "int8"                # int8 | int4 | int3 | nf4 | w8a8
    group_size: int = 128               # int4 / int3: columns per scale
    symmetric: bool = True
    method: str = "rtn"                 # rtn | gptq


@dataclass
class CalibrationSection:
    text: Optional[str] = None          # a plain text file
    samples: int = 128                  # windows of seq_len tokens
    seq_len: int = 128
    heldout_fraction: float = 0.1       # the tail kept out of calibration (the eval text)
    seed: int = 0


@dataclass
class EvalSection:
    text: Optional[str] = None
    window: int = 128
    heldout_fraction: float = 0.1
    max_windows: Optional[int] = None
    batch_size: int = 8


@dataclass
class CompressRecipe:
    model: str = ""
    out: str = ""
    prune: Optional[PruneSection] = None
    structured: Optional[StructuredSection] = None
    quantize: Optional[QuantizeSection] = None
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    eval: Optional[EvalSection] = None
    progress: bool = True


def calibration_windows(section: CalibrationSection, tokenizer) -> Optional[torch.Tensor]:
    """(samples, seq_len) token windows drawn from the text before its held-out tail, or None."""
    if section.text is None:
        return None
    ids = tokenizer.encode(Path(section.text).read_text(encoding="utf-8"), add_special_tokens=False)
    usable = int(len(ids) * (1 - section.heldout_fraction)) - section.seq_len
    if usable <= 0:
        raise RecipeError(f"calibration.text={section.text!r}: {len(ids)} tokens leave no window of "
                          f"seq_len={section.seq_len} before the held-out tail")
    starts = torch.randint(0, usable, (section.samples,), generator=torch.Generator().manual_seed(section.seed))
    ids = torch.tensor(ids, dtype=torch.long)
    return torch.stack([ids[s: s + section.seq_len] for s in starts.tolist()])


def _weight_stats(model) -> dict:
    """Bytes and bits per weight of the block matrices (what compression acts on) and of the whole model."""
    from .compress.targets import linear_targets
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    stats = {"model_bytes": total}
    weights = [getattr(m, "weight", None) for m in linear_targets(model).values()]
    weights = [w for w in weights if w is not None]
    if weights:
        n = sum(w.numel() for w in weights)
        stats["sparsity"] = sum((w == 0).sum().item() for w in weights) / n
    return stats


def run_compress(job: CompressRecipe) -> dict:
    from .compress import prune, prune_attention_heads, prune_ffn_channels, quantize, save_quantized
    if not job.model or not job.out:
        raise RecipeError(f"compress: model={job.model!r} out={job.out!r}: expected a model folder and an output folder")
    if job.prune is None and job.structured is None and job.quantize is None:
        raise RecipeError("compress: no step: expected at least one of prune:, structured:, quantize:")
    loaded = load_artifacts(job.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = calibration_windows(job.calibration, tokenizer)
    report: dict = {"model": job.model, "steps": [], "before": _weight_stats(model)}
    start = time.perf_counter()
    if job.structured is not None:
        s = job.structured
        if s.ffn_fraction:
            report["steps"].append({"structured_ffn": prune_ffn_channels(model, s.ffn_fraction, calibration=calibration)})
        if s.head_fraction:
            report["steps"].append({"structured_heads": prune_attention_heads(model, s.head_fraction,
                                                                              calibration=calibration)})
    if job.prune is not None:
        p = job.prune
        out = prune(model, p.method, p.sparsity, n_m=p.n_m, calibration=calibration, progress=job.progress)
        report["steps"].append({"prune": {**asdict(p), "overall_sparsity": out.get("sparsity")}})
    after = _weight_stats(model)                  # sparsity is read before quantization packs the weights
    if job.quantize is not None:
        q = job.quantize
        quantize(model, q.scheme, group_size=q.group_size, symmetric=q.symmetric, method=q.method,
                 calibration=calibration, progress=job.progress)
        report["steps"].append({"quantize": asdict(q)})
    report["seconds"] = time.perf_counter() - start
    report["after"] = {**after, **_weight_stats(model)}
    if getattr(model, "quantization_config", None) is not None:
        save_quantized(model, job.out, tokenizer)
    else:
        save_artifacts(job.out, model, tokenizer, job="compress")
    if job.eval is not None:
        report["eval"] = _evaluate(job, model, job.model)
    Path(job.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(job.out) / "compression_report.json", json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=2))
    return report


def _evaluate(job: CompressRecipe, model, reference_dir: str) -> dict:
    """Both protocols on the held-out tail: ppl of the compressed and the input model, and kld."""
    from .compress.quality import heldout_ids, kl_divergence, perplexity
    e = job.eval
    reference = load_artifacts(reference_dir)
    text = e.text or job.calibration.text
    if text is None:
        raise RecipeError("compress: eval.text=None and no calibration.text: expected a held-out text file")
    ids = heldout_ids(Path(text).read_text(encoding="utf-8"), reference.tokenizer, e.heldout_fraction)
    options = dict(window=e.window, batch_size=e.batch_size, max_windows=e.max_windows)
    ppl, ppl_ref = perplexity(model, ids, **options), perplexity(reference.model, ids, **options)
    return {"ppl": {**ppl, "ppl_ref": ppl_ref["ppl"], "delta_ppl_pct": 100 * (ppl["ppl"] / ppl_ref["ppl"] - 1)},
            "kld": kl_divergence(model, reference.model, ids, **options)}
