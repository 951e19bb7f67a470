"""`llmkit eval model=DIR data=...`: the metrics of a saved model on a data set, through its Task.

    classification  loss, accuracy, precision / recall / F1 (macro and micro), confusion matrix
    causal LM       loss and perplexity over response tokens; with generate: exact match of the
                    greedy answer to the reference response

`llmkit eval metric=ppl|kld model=DIR text=FILE [reference=DIR]`: the compression quality protocols
of llmkit.compress.quality on the held-out tail of a text file (the split `llmkit pretrain` made):
`ppl` scores every position of non-overlapping windows (the pruning papers); `kld` is llama.cpp's
KL-divergence protocol against the full-precision `reference`. The result names its protocol.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..recipes import RecipeError
from .data import load_rows
from .metrics import format_metrics
from .sft import load_template
from .tasks import TaskOptions, load_task


@dataclass
class EvalRecipe:
    model: str = ""                      # a folder written by `llmkit finetune` (or any HF / llmkit checkpoint)
    data: Any = None                     # a path, rows or {hf: ...}, as in a finetune recipe
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    rows: Optional[int] = None           # a seeded random subset of the rows
    seed: int = 0
    max_len: int = 128
    batch_size: int = 32
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    generate: bool = True                # causal LM: greedy answers scored by exact match
    max_new_tokens: int = 32
    out: Optional[str] = None            # also write the metrics here (.json)
    # ---- metric: ppl | kld (the compression quality protocols; data is not used) ----
    metric: Optional[str] = None         # ppl | kld
    text: Optional[str] = None           # a plain text file; its last heldout_fraction of tokens is scored
    heldout_fraction: float = 0.1
    window: int = 128                    # tokens per non-overlapping window
    max_windows: Optional[int] = None
    reference: Optional[str] = None      # kld: the full-precision model folder


METRICS = ("ppl", "kld")


def run_eval(job: EvalRecipe) -> dict:
    """Metrics of a checkpoint on a data set; prints a markdown table and returns the dict."""
    if job.metric is not None:
        return _write(job, run_quality(job))
    if not job.model or job.data is None:
        raise RecipeError(f"eval: model={job.model!r} data={job.data!r}: expected a checkpoint folder and a data source")
    options = TaskOptions(max_len=job.max_len, template=load_template(job.chat_template),
                          system_prompt=job.system_prompt, generate=job.generate, max_new_tokens=job.max_new_tokens)
    task, model, tokenizer = load_task(job.model, options)
    rows, shape = load_rows(job.data, "eval", job.format, task.name, job.columns, job.rows, job.seed)
    metrics = task.evaluate(model, task.eval_set(rows, shape, tokenizer, job.batch_size))
    print(format_metrics(metrics, title=f"{job.model} on {len(rows)} rows"))
    return _write(job, metrics)


def _write(job: EvalRecipe, metrics: dict) -> dict:
    if job.out:
        Path(job.out).parent.mkdir(parents=True, exist_ok=True)
        Path(job.out).write_text(json.dumps(metrics, indent=2))
    return metrics


def run_quality(job: EvalRecipe) -> dict:
    """metric=ppl | kld on the held-out tail of `text` (llmkit.compress.quality)."""
    from ..compress.quality import heldout_ids, kl_divergence, perplexity
    from ..jobs.artifacts import load_artifacts
    if job.metric not in METRICS:
        raise RecipeError(f"eval: metric={job.metric!r}: expected one of {', '.join(METRICS)}")
    if not job.model or not job.text:
        raise RecipeError(f"eval: model={job.model!r} text={job.text!r}: metric={job.metric} needs a model "
                          f"folder and a text file")
    if job.metric == "kld" and not job.reference:
        raise RecipeError("eval: reference=None: metric=kld needs the full-precision model folder (reference=DIR)")
    loaded = load_artifacts(job.model)
    ids = heldout_ids(Path(job.text).read_text(encoding="utf-8"), loaded.tokenizer, job.heldout_fraction)
    options = dict(window=job.window, batch_size=job.batch_size, max_windows=job.max_windows)
    if job.metric == "ppl":
        metrics = perplexity(loaded.model, ids, **options)
    else:
        metrics = kl_divergence(loaded.model, load_artifacts(job.reference).model, ids, **options)
    # 6 significant digits: a good int8 model's KLD is ~1e-5, below a fixed 4-decimal format
    print("\n".join([f"### {job.model}", "", f"protocol: {metrics['protocol']}", "", "| metric | value |", "|---|---|"]
                    + [f"| {k} | {v:.6g} |" for k, v in metrics.items() if isinstance(v, (int, float))]))
    return metrics
