"""Fine-tuning: instruction SFT for decoders, sequence / token classification, evaluation metrics,
hyperparameter search and catastrophic-forgetting remedies, all on the one Trainer.

    from llmkit.finetune import parse_finetune_recipe, run_finetune
    summary = run_finetune(parse_finetune_recipe(load_yaml("recipes/finetune_minilm_sst2.yaml")))

`llmkit finetune recipe.yaml`, `llmkit eval model=... data=...` and `llmkit tune recipe.yaml` are the
command-line faces of `run_finetune`, `run_eval` and `run_tune`.
"""
from .data import LabelVocab, load_rows
from .evaluate import EvalRecipe, evaluate_classification, evaluate_generation, evaluate_lm, run_eval
from .metrics import classification_metrics, confusion_matrix, exact_match, format_metrics, perplexity
from .models import build_finetune_model, load_finetuned, save_finetuned
from .recipe import FinetuneRecipe, parse_finetune_recipe
from .runner import run_finetune
from .sft import SFTBatches, encode_chat, encode_sft_rows, sft_loss
from .tune import run_tune

__all__ = ["FinetuneRecipe", "parse_finetune_recipe", "run_finetune", "run_tune", "run_eval", "EvalRecipe",
           "LabelVocab", "load_rows", "encode_chat", "encode_sft_rows", "SFTBatches", "sft_loss",
           "classification_metrics", "confusion_matrix", "exact_match", "perplexity", "format_metrics",
           "evaluate_classification", "evaluate_lm", "evaluate_generation", "build_finetune_model",
           "load_finetuned", "save_finetuned"]
