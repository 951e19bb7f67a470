"""The forgetting section of a finetune recipe: the before/after report, a pretraining mix and the
L2 pull to the initial weights, wired into run_finetune."""
from __future__ import annotations

import json

import pytest

from llmkit.finetune import parse_finetune_recipe, run_finetune
from llmkit.recipes import RecipeError

PAIRS = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(8) for b in range(8)]
PRETRAIN = [f"{a}*{b}={a * b}" for a in range(10) for b in range(10)]


def _recipe(tmp_path, **forgetting) -> dict:
    return {
        "model": {"preset": "llama-tiny", "tokenizer": "char",
                  "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64},
        "data": {"train": PAIRS, "max_len": 48, "batch_size": 8,
                 "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 6, "lr": 1e-2, "progress": False,
                  "tensorboard": False, "plot": False, "log_every": 1},
        "forgetting": {"heldout": PRETRAIN, "block_size": 16, "batches": 4, **forgetting},
    }


def _logged(tmp_path, key):
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def test_report_and_both_remedies_run_in_a_finetune(tmp_path):
    recipe = _recipe(tmp_path, l2_init=0.5, mix_pretrain={"source": PRETRAIN, "weight": 0.5, "block_size": 16})
    summary = run_finetune(parse_finetune_recipe(recipe), verbose=False)
    report = summary["forgetting"]
    assert report["before"]["tokens"] == report["after"]["tokens"] > 0          # the same held-out windows
    assert report["delta"]["ppl"] == pytest.approx(report["after"]["ppl"] - report["before"]["ppl"])
    assert report["after"]["ppl"] != report["before"]["ppl"]                   # training moved the model
    l2 = _logged(tmp_path, "l2_init")
    assert l2 and l2[0] == pytest.approx(0.0, abs=1e-9) and max(l2) > 0        # zero at the initial weights
    assert _logged(tmp_path, "task_loss") and _logged(tmp_path, "pretrain_loss")   # the mix logs both parts


def test_mixing_pretraining_text_needs_a_causal_lm(tmp_path):
    recipe = _recipe(tmp_path, mix_pretrain={"source": PRETRAIN, "weight": 1.0})
    recipe["model"]["task"] = "sequence_classification"
    with pytest.raises(RecipeError, match="mix_pretrain.*causal_lm"):
        parse_finetune_recipe(recipe)
