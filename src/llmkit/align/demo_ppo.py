"""The demo's RLHF stage: PPO on the SFT model, rewarded by exact match on the synthetic tasks.

The synthetic tasks have known answers, so the reward is the truth itself (no reward model to
over-optimise): R(x, y) = 1 if y matches x's answer (`data.synthetic.exact_match`'s normalisation),
else 0. PPO (`ppo.py`, KL penalty to the SFT model) samples answers to training questions at τ = 1
and learns from their rewards; the report is greedy exact match on held-out questions before and
after, the KL to the SFT model on the held-out correct answers (per token, exact over the
vocabulary, as the DPO stage reports it) and the rollouts' reward over training.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..train import TrainConfig
from .data import tokenize_rows
from .demo_stage import _questions, held_out_kl
from .objectives import frozen_copy
from .on_policy import complete, is_correct
from .ppo import PPOConfig, PPOTrainer


class ExactMatchReward:
    """R = 1.0 where the completion is the prompt's known answer, else 0.0."""

    def __init__(self, rows: list[dict]):
        self.answers = {r["prompt"]: r["answer"] for r in rows}

    def __call__(self, prompts, completions) -> list[float]:
        return [float(is_correct(c, self.answers[p])) for p, c in zip(prompts, completions)]


def _exact_match(model, tokenizer, rows, max_new_tokens: int) -> float:
    answers = complete(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)
    return sum(is_correct(a, r["answer"]) for a, r in zip(answers, rows)) / max(len(rows), 1)


def ppo_stage(model, tokenizer, tasks, *, chat_template: Optional[str] = None, out_dir: str = "runs/demo/ppo",
              seed: int = 0, prompts: int = 3000, questions: int = 200, iterations: int = 30, lr: float = 1e-5,
              kl_coef: float = 0.05, temperature: float = 1.0, max_new_tokens: int = 12) -> dict:
    """Train `model` in place with PPO on exact match; returns {"before", "after", "kl", "reward_first",
    "reward_last", "iterations", "seconds"}."""
    start = time.time()
    train_rows = _questions(tasks, prompts, "train", tokenizer, chat_template)
    test_rows = _questions(tasks, questions, "test", tokenizer, chat_template)
    before = _exact_match(model, tokenizer, test_rows, max_new_tokens)
    reference = frozen_copy(model)
    reward = ExactMatchReward(train_rows)
    config = PPOConfig(iterations=iterations, rollout_batch_size=64, minibatch_size=32, ppo_epochs=2,
                       max_new_tokens=max_new_tokens, kl_coef=kl_coef, temperature=temperature, seed=seed)
    train = TrainConfig(out_dir=str(Path(out_dir)), lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0,
                        log_every=config.steps_per_rollout, seed=seed, progress=False, tensorboard=False, plot=False,
                        keep_last=1, save_every=0)
    trainer = PPOTrainer(model, tokenizer, [r["prompt"] for r in train_rows], reward, config=config, train=train,
                         reference=reference)
    trainer.fit()
    scores = [s["objective/scores"] for s in trainer.source.history]
    after = _exact_match(model, tokenizer, test_rows, max_new_tokens)
    kl_rows = tokenize_rows([{"prompt": r["prompt"], "completion": r["answer"], "label": True} for r in test_rows],
                            tokenizer, max_length=model.config.max_seq_len)
    n = max(1, len(scores) // 5)
    return {"iterations": iterations, "before": {"exact_match": round(before, 4)},
            "after": {"exact_match": round(after, 4)}, "kl": held_out_kl(model, reference, kl_rows, tokenizer.pad_id),
            "reward_first": round(sum(scores[:n]) / n, 4), "reward_last": round(sum(scores[-n:]) / n, 4),
            "seconds": round(time.time() - start, 1)}


def run_demo_ppo(model_dir, out_dir, tasks, *, chat_template: Optional[str] = None, seed: int = 0,
                 questions: int = 200, **options) -> dict:
    """`llmkit demo`'s stage: load the SFT model, run `ppo_stage`, print, save to out_dir/model."""
    from ..jobs.artifacts import load_artifacts, save_artifacts
    saved = load_artifacts(model_dir)
    model, tokenizer = saved.model, saved.tokenizer
    result = ppo_stage(model, tokenizer, tasks, chat_template=chat_template, out_dir=str(out_dir), seed=seed,
                       questions=questions, **options)
    print(f"PPO with an exact-match reward ({result['iterations']} rollouts of 64): exact match on {questions} "
          f"held-out questions {result['before']['exact_match']:.1%} -> {result['after']['exact_match']:.1%}; "
          f"rollout reward {result['reward_first']:.3f} -> {result['reward_last']:.3f}; KL to the SFT model "
          f"{result['kl']:.4f} a token  [{result['seconds']:.0f} s]")
    save_artifacts(Path(out_dir) / "model", model, tokenizer, job="align", task="causal_lm")
    return result
