"""Fine-tuning: instruction SFT for decoders, sequence / token classification, evaluation metrics,
hyperparameter search and catastrophic-forgetting remedies, all on the one Trainer.

    from llmkit.finetune import parse_finetune_recipe, run_finetune
    summary = run_finetune(parse_finetune_recipe(load_yaml("recipes/finetune_minilm_sst2.yaml")))

tasks.py holds the Task objects (encode, batches, loss, evaluate, head, save/load); pipeline.py the
`llmkit finetune` job, eval_job.py `llmkit eval`, tune.py `llmkit tune`, loops.py the metric loops.
"""
from .data import LabelVocab, load_rows
from .eval_job import EvalRecipe, run_eval
from .loops import evaluate_classification, evaluate_generation, heldout_perplexity
from .metrics import classification_metrics, confusion_matrix, exact_match, format_metrics, perplexity
from .pipeline import run_finetune
from .recipe import FinetuneRecipe, parse_finetune_recipe
from .sft import SFTBatches, encode_chat, encode_sft_rows, sft_loss
from .tasks import FINETUNE_TASKS, Task, TaskOptions, load_task, make_task
from .tune import run_tune

__all__ = ["FinetuneRecipe", "parse_finetune_recipe", "run_finetune", "run_tune", "run_eval", "EvalRecipe",
           "LabelVocab", "load_rows", "encode_chat", "encode_sft_rows", "SFTBatches", "sft_loss",
           "classification_metrics", "confusion_matrix", "exact_match", "perplexity", "format_metrics",
           "evaluate_classification", "heldout_perplexity", "evaluate_generation", "FINETUNE_TASKS", "Task",
           "TaskOptions", "load_task", "make_task"]
