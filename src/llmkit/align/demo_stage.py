"""The demo's preference stage: align an SFT'd model on its own mistakes and report what changed.

1. Pairs, on-policy (`on_policy.on_policy_pairs`): for `prompts` training questions of
   `SyntheticTasks`, chosen = the correct answer, rejected = the model's own wrong answer (greedy,
   or one of `samples` draws when the greedy answer is right). Synthetic wrong answers that the
   model never gives move margins but not its answers; its own mistakes move both.
2. Training: `method` (dpo | ipo | kto | orpo) on those pairs with the Trainer; the reference of
   DPO, IPO and KTO is a frozen copy of the starting model.
3. Report: exact match of greedy answers on `questions` held-out questions before and after;
   rewards/margins over training (mean of the first and of the last tenth of the steps) and on the
   held-out pairs (the starting model's wrong held-out answers) before and after; the KL to the
   starting model on the held-out correct answers: the mean over their tokens of
   KL(π(·|x_<t) ‖ π_ref(·|x_<t)), computed exactly over the vocabulary.

Prompts: with `chat_template` (the demo's SFT format) each question is rendered as a user turn with
the generation prompt, in instruction phrasing ("Compute 12+7."); without one, the compact prompt
("12+7=") follows an EOS, the pretraining layout.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..model.modes import evaluating
from ..train import TrainConfig, Trainer
from .data import PreferenceBatches, _sequences, normalize_rows, to_unpaired, tokenize_rows
from .logps import mean_token_kl
from .objectives import frozen_copy, make_alignment_objective
from .on_policy import on_policy_pairs

# Chosen on the slow test's model (tests/test_align_slow.py has the figures). Without the NLL term
# (RPO) DPO, IPO and KTO push the model's own answers down faster than the right ones up: plain DPO
# fell from 16% to 4% held-out exact match (KL 3.8). IPO's target margin 1/(2τ) is per token here
# (length-normalised), so τ = 1 (a margin of 0.5 nat a token) rather than the summed form's 0.1.
DEFAULT_OPTIONS = {"dpo": {"beta": 0.1, "nll_coef": 1.0}, "ipo": {"tau": 1.0, "nll_coef": 1.0},
                   "kto": {"beta": 0.1, "nll_coef": 1.0}, "orpo": {"lam": 1.0}}


class _MetricLog:
    def __init__(self):
        self.steps: list[dict] = []

    def on_step_end(self, trainer, step, metrics):
        self.steps.append(dict(metrics))


def _window_mean(steps: list[dict], key: str, first: bool) -> float:
    n = max(1, len(steps) // 10)
    window = steps[:n] if first else steps[-n:]
    return round(sum(m[key] for m in window) / len(window), 4)


@torch.no_grad()
def held_out_kl(model, reference, examples, pad_id: int, batch_size: int = 64) -> float:
    """Mean per-token KL(π ‖ π_ref) over the completions of examples {"prompt_ids", "completion_ids"}."""
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = _sequences([(e["prompt_ids"], e["completion_ids"]) for e in chunk], pad_id)
            ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]       # (B, T) each
            kl = mean_token_kl(model(ids, attention_mask=am).logits, reference(ids, attention_mask=am).logits, lm)
            n = int(lm[:, 1:].sum())
            total, count = total + kl.item() * n, count + n
    return round(total / max(count, 1), 5)


def _questions(tasks, n: int, split: str, tokenizer, chat_template: Optional[str]) -> list[dict]:
    rows = []
    for ex in tasks.sample(n, split=split):
        if chat_template is None:
            prompt = ex.prompt
        else:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.instruction}],
                                                   add_generation_prompt=True, chat_template=chat_template)
        rows.append({"prompt": prompt, "answer": ex.answer})
    return rows


def preference_stage(model, tokenizer, tasks, method: str = "dpo", steps: int = 100, out_dir: str = "runs/demo/align",
                     seed: int = 0, *, chat_template: Optional[str] = None, prompts: int = 3000, samples: int = 2,
                     temperature: float = 1.0, questions: int = 200, batch_size: int = 16, lr: float = 5e-5,
                     options: Optional[dict] = None, max_length: int = 96, max_new_tokens: int = 12) -> dict:
    """Train `model` (in place) with `method` on on-policy pairs from `tasks` (see the module docstring)
    and return {"method", "steps", "pairs", "before", "after", "rewards/margins", "rewards/accuracies",
    "kl", "seconds"}; "pairs" holds the counts from on_policy_pairs for the training prompts.

    The defaults (100 steps x 16 pairs at lr 5e-5 on ~1,200 pairs from 3,000 prompts: about one epoch)
    suit a model as trained as the demo's; on that model lr 3e-4 for 300 steps (~12 epochs of 413
    pairs) cost 9 points of held-out exact match. A weaker model (tests/test_align_slow.py) gains
    from lr 3e-4, 300 steps."""
    if method not in DEFAULT_OPTIONS:
        raise ValueError(f"method={method!r}: expected one of {sorted(DEFAULT_OPTIONS)}")
    start = time.time()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_id
    prefix = [eos] if chat_template is None else []          # a rendered template writes its own EOS
    token_args = dict(max_length=max_length, prefix_ids=prefix)
    gen_args = dict(prefix_ids=prefix, max_new_tokens=max_new_tokens)

    train_pairs, pair_stats = on_policy_pairs(model, tokenizer, _questions(tasks, prompts, "train", tokenizer,
                                                                           chat_template),
                                              samples=samples, temperature=temperature, seed=seed, **gen_args)
    test_questions = _questions(tasks, questions, "test", tokenizer, chat_template)
    test_pairs, test_stats = on_policy_pairs(model, tokenizer, test_questions, **gen_args)   # greedy: EM before
    if not train_pairs:
        raise ValueError(f"preference_stage: the model gave no wrong answer on {prompts} training prompts "
                         f"({samples} samples each): nothing to prefer against")
    train_rows, test_rows = normalize_rows(train_pairs), normalize_rows(test_pairs) if test_pairs else []
    if method == "kto":
        train_rows, test_rows = to_unpaired(train_rows), to_unpaired(test_rows)
    train_examples = tokenize_rows(train_rows, tokenizer, **token_args)
    train = PreferenceBatches(train_examples, min(batch_size, len(train_examples)), pad, seed=seed)
    val = None
    if len(test_rows) >= 2:                  # held-out pairs: the starting model's wrong held-out answers
        test_examples = tokenize_rows(test_rows, tokenizer, **token_args)
        val = PreferenceBatches(test_examples, min(batch_size, len(test_examples)), pad, shuffle=False).fixed(8)
    kl_examples = tokenize_rows([{"prompt": q["prompt"], "completion": q["answer"], "label": True}
                                 for q in test_questions], tokenizer, **token_args)

    reference = frozen_copy(model)
    objective = make_alignment_objective(method, reference if method != "orpo" else None,
                                         **{**DEFAULT_OPTIONS[method], **(options or {})})
    log = _MetricLog()
    config = TrainConfig(out_dir=str(Path(out_dir)), max_steps=steps, lr=lr, min_lr=lr / 10,
                         warmup_steps=min(10, steps // 10), betas=(0.9, 0.95), weight_decay=0.0, eval_every=0,
                         log_every=max(1, steps // 10), seed=seed, progress=False, tensorboard=False, plot=False,
                         keep_last=1)
    trainer = Trainer(model, objective.loss, train, val_data=val, config=config, callbacks=[log])
    val_before = trainer.evaluate() if val else {}
    trainer.fit()
    val_after = trainer.evaluate() if val else {}
    _, after_stats = on_policy_pairs(model, tokenizer, test_questions, **gen_args)
    margin = lambda m: round(m["rewards/margins"], 4) if m else None  # noqa: E731
    return {"method": method, "steps": steps, "pairs": pair_stats,
            "before": {"exact_match": round(test_stats["greedy_correct"], 4)},
            "after": {"exact_match": round(after_stats["greedy_correct"], 4)},
            "rewards/margins": {"train_first": _window_mean(log.steps, "rewards/margins", True),
                                "train_last": _window_mean(log.steps, "rewards/margins", False),
                                "held_out_before": margin(val_before), "held_out_after": margin(val_after)},
            "rewards/accuracies": round(val_after["rewards/accuracies"], 4) if "rewards/accuracies" in val_after
            else None,
            "kl": held_out_kl(model, reference, kl_examples, pad),
            "seconds": round(time.time() - start, 1)}


def run_demo_preference(model_dir, out_dir, tasks, *, method: str = "dpo", chat_template: Optional[str] = None,
                        seed: int = 0, questions: int = 200, **options) -> dict:
    """`llmkit demo`'s stage: load the SFT model from `model_dir`, run `preference_stage`, print the
    figures, save the aligned model (Hugging Face format + tokenizer) to out_dir/model and return the
    result. `options` go to preference_stage (steps, lr, prompts, ...)."""
    from ..jobs.artifacts import load_artifacts, save_artifacts
    saved = load_artifacts(model_dir)
    model, tokenizer = saved.model, saved.tokenizer
    result = preference_stage(model, tokenizer, tasks, method, out_dir=str(out_dir), seed=seed,
                              chat_template=chat_template, questions=questions, **options)
    margins, pairs = result["rewards/margins"], result["pairs"]
    print(f"{method.upper()} on {pairs['pairs']} pairs of the model's own wrong answers ({result['steps']} steps): "
          f"exact match on {questions} held-out questions {result['before']['exact_match']:.1%} -> "
          f"{result['after']['exact_match']:.1%}; rewards/margins {margins['train_first']:.3f} -> "
          f"{margins['train_last']:.3f} in training, {margins['held_out_before']} -> {margins['held_out_after']} "
          f"held out; KL to the SFT model {result['kl']:.4f} a token  [{result['seconds']:.0f} s]")
    save_artifacts(Path(out_dir) / "model", model, tokenizer, job="align", task="causal_lm")
    return result
