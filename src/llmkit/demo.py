"""`llmkit demo`: the README's main job, end to end on a laptop CPU with nothing downloaded.

Stages (later issues add theirs: SFT, preference alignment, ...):
1. data: `llmkit.data.synthetic` writes procedural tasks with exact answers (arithmetic,
   copy/reverse, key-value recall, facts about a made-up world); a character tokenizer is trained.
2. pretrain: a small Llama-style decoder learns them with the causal LM loss on the Trainer.
3. report: validation loss and exact-match accuracy on held-out questions (prompts never seen in
   training), before and after, plus samples.
The run folder gets the Hugging Face checkpoint with its tokenizer, metrics.jsonl, TensorBoard
events, loss.png and summary.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data.synthetic import SyntheticTasks, exact_match
from .generation import generate
from .pretrain import parse_recipe, prepare_pretraining, save_model

DEMO_RECIPE = {
    "model": {"preset": "llama-tiny", "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
              "d_ff": 352, "max_seq_len": 256},
    "data": {"source": "synthetic", "synthetic_examples": 30000, "tokenizer": "char", "block_size": 96,
             "batch_size": 32, "val_fraction": 0.05},
    "train": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 100, "weight_decay": 0.1, "betas": [0.9, 0.98],
              "eval_every": 250, "eval_batches": 10, "log_every": 25, "precision": "bf16", "keep_last": 1},
    "objective": "clm",
}


def answer_questions(model, tokenizer, examples, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers. Each prompt starts after an EOS, as every training document does."""
    eos = tokenizer.eos_token_id
    answers = []
    for example in examples:
        prompt = torch.tensor([[eos] + tokenizer.encode(example.prompt, add_special_tokens=False)])
        out = generate(model, prompt, max_new_tokens=max_new_tokens, stop_token_ids=[eos])
        answers.append(tokenizer.decode(out[0, prompt.shape[1]:].tolist()))
    return answers


def evaluate(setup, examples) -> dict:
    trainer = setup.trainer(progress=False)
    val_loss = trainer.evaluate()["loss"]
    predictions = answer_questions(setup.model, setup.tokenizer, examples)
    return {"val_loss": round(val_loss, 4), "exact_match": round(exact_match(predictions, examples), 4)}


def run_demo(out_dir: str = "runs/demo", steps: int = 1500, seed: int = 0, questions: int = 200) -> dict:
    start = time.time()
    recipe = parse_recipe({**DEMO_RECIPE, "train": {**DEMO_RECIPE["train"], "out_dir": out_dir,
                                                    "max_steps": steps, "seed": seed,
                                                    "warmup_steps": min(100, steps // 10)}})
    print("== stage 1: synthetic data and a character tokenizer")
    setup = prepare_pretraining(recipe)
    held_out = SyntheticTasks(seed=recipe.data.seed).sample(questions, split="test")

    print("== stage 2: pretraining (causal LM)")
    before = evaluate(setup, held_out)
    print(f"before: val loss {before['val_loss']:.3f}, exact match {before['exact_match']:.1%} "
          f"on {questions} held-out questions")
    result = setup.trainer().fit()
    after = evaluate(setup, held_out)
    print(f"after:  val loss {after['val_loss']:.3f}, exact match {after['exact_match']:.1%} "
          f"({result.step} steps)")

    print("== samples (held-out questions, greedy)")
    for example, answer in zip(held_out[:6], answer_questions(setup.model, setup.tokenizer, held_out[:6])):
        mark = "ok" if answer.strip() == example.answer else f"expected {example.answer}"
        print(f"  {example.prompt}{answer.strip():<10} [{mark}]")

    out = Path(out_dir)
    save_model(setup.model, setup.tokenizer, out / "model")
    summary = {"pretrain": {"before": before, "after": after, "steps": result.step},
               "seconds": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/: model/ (Hugging Face format + tokenizer), metrics.jsonl, loss.png, "
          f"tensorboard/, summary.json  [{summary['seconds']:.0f} s]")
    return summary
