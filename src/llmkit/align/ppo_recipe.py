"""`llmkit align recipe.yaml method=ppo`: PPO-RLHF from a recipe (see `ppo.py` for the method).

    method:  ppo
    options: any PPOConfig field (iterations, rollout_batch_size, minibatch_size, ppo_epochs,
             max_new_tokens, temperature, kl_coef, kl_estimator, target_kl, critic, ...)
    model:   from: the SFT policy (a checkpoint folder and its tokenizer)
    reward:  from: a reward model folder (`llmkit align method=rm` saves one; its tokenizer must be the
                   policy's)
           | text: toy_reviews (the toy task's exact reward, no model)
           | judge: a causal-LM folder (d-RLAIF: the judge's 1–10 score is the reward, no reward model)
    data:    source: toy_reviews | a .jsonl(.gz) of rows with a "prompt" (or HH-RLHF "chosen" dialogues:
             the prompt is everything up to the last "Assistant:"); max_prompt_length: prompts longer
             than this many tokens are an error (so are prompts that leave no room for max_new_tokens)
    peft:    optional LoRA block: the policy trains adapters and is its own reference (adapters off)
    track:   optional [toy_reviews]: log the toy task's true reward as objective/toy_reviews
    train:   TrainConfig fields; max_steps is set from options (iterations × ppo_epochs × minibatches)

Leaves in train.out_dir: model/ (the policy, merged when peft), metrics.jsonl, TensorBoard events,
checkpoints/, samples.jsonl (the last rollout's prompts, completions and scores), summary.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..jobs.artifacts import load_artifacts, save_artifacts
from ..jobs.peft_block import apply_peft_block
from ..recipes import RecipeError, to_yaml
from . import toy_reviews
from .data import normalize_rows, read_rows
from .ppo import PPOConfig, PPOTrainer

TEXT_REWARDS = {"toy_reviews": toy_reviews.true_reward}


def _reward(section: dict, tokenizer):
    if not isinstance(section, dict) or len(section) != 1 or next(iter(section)) not in ("from", "text", "judge"):
        raise RecipeError(f"reward={section!r}: expected one of {{from: <reward model folder>}}, "
                          f"{{text: {' | '.join(TEXT_REWARDS)}}}, {{judge: <causal LM folder>}}")
    kind, value = next(iter(section.items()))
    if kind == "text":
        if value not in TEXT_REWARDS:
            raise RecipeError(f"reward.text={value!r}: expected one of {list(TEXT_REWARDS)}")
        return TEXT_REWARDS[value], None
    saved = load_artifacts(value)
    if kind == "from":
        if not hasattr(saved.model, "value_head"):
            raise RecipeError(f"reward.from={value!r}: holds a {type(saved.model).__name__}: expected a reward model "
                              "(task 'reward', as `llmkit align method=rm` saves)")
        return saved.model, saved.tokenizer
    from .score_judge import ScoreJudge
    return ScoreJudge(saved.model, saved.tokenizer), None


def _prompts(data) -> list[str]:
    if data.source == "toy_reviews":
        return toy_reviews.prompts(data.synthetic_examples, seed=data.seed)
    if data.source == "synthetic":
        raise RecipeError("data.source='synthetic' has no prompt-only form for ppo: expected toy_reviews or a file")
    rows = normalize_rows(read_rows(data.source), bad_rows=data.bad_rows)
    return list(dict.fromkeys(r["prompt"] for r in rows))       # unique, in file order


def run_ppo(recipe) -> dict:
    start = time.time()
    out = Path(recipe.train.out_dir)
    if recipe.model.checkpoint is None:
        raise RecipeError("method=ppo: model.from is required: the SFT policy to start from (a checkpoint folder)")
    if recipe.reward is None:
        raise RecipeError("method=ppo: reward is required ({from: <reward model>}, {text: toy_reviews} or "
                          "{judge: <causal LM>})")
    saved = load_artifacts(recipe.model.checkpoint)
    policy, tokenizer = saved.model, saved.tokenizer
    try:
        config = PPOConfig(**recipe.options)
    except TypeError as exc:
        raise RecipeError(f"options: {exc}: expected PPOConfig fields") from exc
    except ValueError as exc:
        raise RecipeError(f"options: {exc}") from exc
    prompts = _prompts(recipe.data)
    limit = recipe.data.max_prompt_length
    if limit is not None:
        long = [i for i, p in enumerate(prompts) if len(tokenizer.encode(p, add_special_tokens=False)) > limit]
        if long:
            raise RecipeError(f"{len(long)} prompt(s) exceed data.max_prompt_length={limit} tokens, e.g. prompts"
                              f"[{long[0]}]: expected shorter prompts (or a larger max_prompt_length)")
    reward, reward_tokenizer = _reward(recipe.reward, tokenizer)
    unknown = [name for name in recipe.track or () if name not in TEXT_REWARDS]
    if unknown:
        raise RecipeError(f"track={unknown!r}: expected names from {list(TEXT_REWARDS)}")
    track = {name: TEXT_REWARDS[name] for name in recipe.track or ()}
    handle = apply_peft_block(policy, recipe.peft, tokenizer)
    prefix = [tokenizer.eos_token_id] if recipe.data.prefix_eos else []
    try:
        trainer = PPOTrainer(policy, tokenizer, prompts, reward, config=config, train=recipe.train, handle=handle,
                             reward_tokenizer=reward_tokenizer, track=track, prefix_ids=prefix)
    except ValueError as exc:           # a tokenizer mismatch, a prompt too long for the context, ...
        raise RecipeError(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"align ppo: {len(prompts)} prompts, {config.iterations} rollouts of {config.rollout_batch_size}, "
          f"{trainable / 1e6:.2f}M trainable parameters (policy + critic)")
    result = trainer.fit()
    save_artifacts(out / "model", policy, tokenizer, job="align", handle=handle, task="causal_lm")
    last = trainer.source.last_rollout or {}
    with open(out / "samples.jsonl", "w") as f:
        for p, c, s in zip(last.get("prompts", []), last.get("completions", []), last.get("scores", [])):
            f.write(json.dumps({"prompt": p, "completion": c, "score": s}) + "\n")
    summary = {"method": "ppo", "status": result.status, "step": result.step, "rollouts": trainer.source.rollouts,
               "beta": trainer.source.kl.beta,
               "metrics": {k: float(v) for k, v in result.metrics.items() if "/" in k},
               "seconds": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done: {trainer.source.rollouts} rollouts, objective/scores {summary['metrics'].get('objective/scores', 0):.3f}, "
          f"objective/kl {summary['metrics'].get('objective/kl', 0):.3f}; model in {out / 'model'}")
    return summary
