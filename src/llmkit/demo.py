"""`llmkit demo`: the README's main job, end to end on a laptop CPU with nothing downloaded.

Stages:
1. data: `llmkit.data.synthetic` writes procedural tasks with exact answers (arithmetic,
   copy/reverse, key-value recall, facts about a made-up world); a character tokenizer is trained.
2. pretrain: a small Llama-style decoder learns them with the causal LM loss on the Trainer.
3. report: validation loss and exact-match accuracy on held-out questions (prompts never seen in
   training), before and after, plus samples.
4. SFT: full fine-tuning on instruction-phrased pairs ("Compute 12+7." -> "19"), loss on the
   answer tokens only (`llmkit.finetune`); exact match on held-out instructions before and after,
   and the forgetting report: perplexity on held-out pretraining text before and after SFT.
5. preference: DPO (with the RPO NLL term on the chosen answer) on pairs whose rejected answer is
   the SFT model's own wrong answer (`llmkit.align`); exact match before/after, rewards/margins and
   the KL to the SFT model; align/model holds the result.
6. RLHF: PPO on the SFT model with the truth as its reward (exact match of sampled answers on
   training questions), KL-penalised to the SFT model (`llmkit.align.ppo`); held-out exact match
   before/after and the KL; ppo/model holds the result.
The run folder gets the Hugging Face checkpoint with its tokenizer, metrics.jsonl, TensorBoard
events, loss.png and summary.json; sft/ and align/ hold the later stages' models and run files.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .align.demo_ppo import run_demo_ppo
from .align.demo_stage import run_demo_preference
from .data.synthetic import SyntheticTasks, exact_match
from .generation import generate
from .jobs.artifacts import save_artifacts
from .pretrain import parse_recipe, prepare_pretraining

# The SFT chat format matches the pretraining layout: every document starts after an EOS, the
# question is followed by "=" and the answer ends with EOS ("<eos>Compute 12+7.=19<eos>").
DEMO_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ eos_token }}{{ m['content'] }}="
                      "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

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


def run_sft_stage(setup, out: Path, *, seed: int, questions: int, steps: int) -> dict:
    """Instruction SFT of the pretrained model; exact match and held-out pretraining perplexity
    before and after."""
    from .finetune import parse_finetune_recipe, run_finetune
    from .finetune.loops import evaluate_generation
    from .finetune.forgetting import format_forgetting
    print("== stage 3: instruction SFT (loss on answer tokens only)")
    tasks = SyntheticTasks(seed=setup.recipe.data.seed)
    train_pairs = tasks.instruction_pairs(6000, split="train")
    test_pairs = tasks.instruction_pairs(questions, split="test")
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
                     for p in test_pairs]
    em_before = evaluate_generation(setup.model, setup.tokenizer, conversations, DEMO_CHAT_TEMPLATE, 12)["exact_match"]
    recipe = parse_finetune_recipe({
        "model": {"from": str(out / "model"), "task": "causal_lm"},
        "data": {"train": train_pairs, "dev": test_pairs, "max_len": 96, "batch_size": 32,
                 "chat_template": DEMO_CHAT_TEMPLATE},
        "train": {"out_dir": str(out / "sft"), "optimizer": "adamw", "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": max(1, steps // 10), "max_steps": steps, "weight_decay": 0.0,
                  "betas": [0.9, 0.98], "log_every": 25, "keep_last": 1, "seed": seed, "precision": "bf16",
                  "eval_metric": "exact_match", "eval_every": max(1, steps // 3)},
        "eval": {"generate": True, "max_new_tokens": 12, "generate_rows": questions},
        "forgetting": {"heldout": tasks.pretraining_text(3000, split="test"), "block_size": 96, "batches": 10},
    })
    summary = run_finetune(recipe, verbose=False)
    em_after = summary["dev"]["exact_match"]
    print(f"exact match on {questions} held-out instructions: before SFT {em_before:.1%}, after {em_after:.1%} "
          f"({summary['steps']} steps, best at step {summary['best_step']})")
    print("forgetting (held-out pretraining text):")
    print(format_forgetting(summary["forgetting"]))
    report = summary["forgetting"]
    return {"exact_match_before": round(em_before, 4), "exact_match_after": round(em_after, 4),
            "steps": summary["steps"], "best_step": summary["best_step"],
            "heldout_ppl_before": round(report["before"]["ppl"], 4), "heldout_ppl_after": round(report["after"]["ppl"], 4),
            "heldout_ppl_change": round(report["delta"]["ppl"], 4)}


def run_demo(out_dir: str = "runs/demo", steps: int = 1500, seed: int = 0, questions: int = 200,
             sft_steps: int = 0) -> dict:
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
    save_artifacts(out / "model", setup.model, setup.tokenizer, job="pretrain", task="causal_lm")
    sft = run_sft_stage(setup, out, seed=seed, questions=questions, steps=sft_steps or max(20, steps // 5))
    print("== stage 4: preference alignment (DPO on the SFT model's own wrong answers)")
    align = run_demo_preference(out / "sft" / "model", out / "align", SyntheticTasks(seed=recipe.data.seed),
                                method="dpo", chat_template=DEMO_CHAT_TEMPLATE, seed=seed, questions=questions)
    print("== stage 5: RLHF (PPO on the SFT model, rewarded by exact match)")
    # Chosen on the demo's model: lr 3e-5 or 1e-4 raised the rollout reward but cost held-out exact
    # match (57.5%, 49.0% from 58.5%); τ = 0.7 keeps the samples near the greedy answers scored.
    ppo = run_demo_ppo(out / "sft" / "model", out / "ppo", SyntheticTasks(seed=recipe.data.seed),
                       chat_template=DEMO_CHAT_TEMPLATE, seed=seed, questions=questions,
                       iterations=max(2, min(40, steps // 35)), lr=1e-5, temperature=0.7)
    summary = {"pretrain": {"before": before, "after": after, "steps": result.step}, "sft": sft,
               "align": align, "ppo": ppo, "seconds": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/: model/ (Hugging Face format + tokenizer), sft/model/ (instruction-tuned), "
          f"align/model (preference-tuned), ppo/model (PPO), "
          f"metrics.jsonl, loss.png, tensorboard/, summary.json  [{summary['seconds']:.0f} s]")
    return summary
