"""`llmkit eval model=DIR data=...`: the metrics of a saved model on a data set, through its Task.

    classification  loss, accuracy, precision / recall / F1 (macro and micro), confusion matrix
    causal LM       loss and perplexity over response tokens; with generate: exact match of the
                    greedy answer to the reference response
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


def run_eval(job: EvalRecipe) -> dict:
    """Metrics of a checkpoint on a data set; prints a markdown table and returns the dict."""
    if not job.model or job.data is None:
        raise RecipeError(f"eval: model={job.model!r} data={job.data!r}: expected a checkpoint folder and a data source")
    options = TaskOptions(max_len=job.max_len, template=load_template(job.chat_template),
                          system_prompt=job.system_prompt, generate=job.generate, max_new_tokens=job.max_new_tokens)
    task, model, tokenizer = load_task(job.model, options)
    rows, shape = load_rows(job.data, "eval", job.format, task.name, job.columns, job.rows, job.seed)
    metrics = task.evaluate(model, task.eval_set(rows, shape, tokenizer, job.batch_size))
    print(format_metrics(metrics, title=f"{job.model} on {len(rows)} rows"))
    if job.out:
        Path(job.out).parent.mkdir(parents=True, exist_ok=True)
        Path(job.out).write_text(json.dumps(metrics, indent=2))
    return metrics
