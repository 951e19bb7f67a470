"""A toy alignment task whose true reward is known: sentiment words in synthetic reviews.

    prompt      "review of the film:"
    completion  " it was great, odd and dull."          three words from 18, uniformly (the SFT data)

    true reward R(y) = (#positive − #negative words) / max(3, #words)  ∈ [−1, 1]

An SFT model of these reviews has E[R] ≈ 0; a reward model is learnt from pairs ranked by R;
PPO (or DPO) should raise R, and the KL to the SFT model says how far it went to get there.
Because R is exact, every stage is measured against the truth: the reward model's held-out
accuracy, PPO's true reward against its KL, and an AI judge's agreement with R.

`BiasedReviewJudge` is a stand-in judge LM with a planted position bias and noise: it reads the
two responses back from the preference prompt and puts logit  s·(R(a) − R(b)) + bias + noise  on
the first label. `train_sft` fits a causal LM to rows with the prompt tokens masked out
(`objectives.clm_loss` with labels = −100 there).
"""
from __future__ import annotations

import random
import re
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

ITEMS = ("film", "book", "show", "meal", "game", "song", "play", "park")
POSITIVE = ("good", "great", "fun", "superb", "lovely", "warm")
NEGATIVE = ("bad", "dull", "awful", "poor", "boring", "cold")
NEUTRAL = ("long", "new", "odd", "quiet", "short", "plain")
WORDS = POSITIVE + NEGATIVE + NEUTRAL
_WORD = re.compile(r"[a-z]+")


def prompt_for(item: str) -> str:
    return f"review of the {item}:"


def review(words: Sequence[str]) -> str:
    return f" it was {words[0]}, {words[1]} and {words[2]}."


def true_reward_one(completion: str) -> float:
    found = [w for w in _WORD.findall(completion.lower()) if w in WORDS]
    if not found:
        return 0.0
    score = sum(w in POSITIVE for w in found) - sum(w in NEGATIVE for w in found)
    return score / max(3, len(found))


def true_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """R per completion (the text-reward signature PPO takes)."""
    return [true_reward_one(c) for c in completions]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """n {"prompt", "completion"} reviews with words drawn uniformly (E[R] = 0)."""
    rng = random.Random(seed)
    return [{"prompt": prompt_for(rng.choice(ITEMS)), "completion": review(rng.choices(WORDS, k=3))}
            for _ in range(n)]


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [prompt_for(rng.choice(ITEMS)) for _ in range(n)]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """n {"prompt", "chosen", "rejected"} pairs of SFT-distributed reviews, chosen = higher R (ties redrawn)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, b = review(rng.choices(WORDS, k=3)), review(rng.choices(WORDS, k=3))
        ra, rb = true_reward_one(a), true_reward_one(b)
        if ra != rb:
            out.append({"prompt": prompt_for(rng.choice(ITEMS)), "chosen": a if ra > rb else b,
                        "rejected": b if ra > rb else a})
    return out


def judge_rows(n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """n unlabelled {"prompt", "a", "b"} pairs (R(a) ≠ R(b)) and the truly better response of each."""
    rows, truth = [], []
    for row in preference_rows(n, seed):
        a, b = (row["chosen"], row["rejected"]) if len(rows) % 2 == 0 else (row["rejected"], row["chosen"])
        rows.append({"prompt": row["prompt"], "a": a, "b": b})
        truth.append(row["chosen"])
    return rows, truth


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering the task's characters (to train a character tokenizer)."""
    return [r["prompt"] + r["completion"] for r in sft_rows(n, seed)] + [" ".join(WORDS + ITEMS) + ":,.AB"]


class BiasedReviewJudge(nn.Module):
    """A stand-in judge LM: logit s·(R(a) − R(b)) + bias + N(0, noise²) on label A, 0 on label B,
    read from the Judge's preference prompt ("Response A: ...\\nResponse B: ..."). Batch size 1."""

    def __init__(self, tokenizer, *, scale: float = 2.0, bias: float = 1.5, noise: float = 0.5, seed: int = 0,
                 labels: Sequence[str] = ("A", "B")):
        super().__init__()
        self.tokenizer, self.scale, self.bias, self.noise = tokenizer, scale, bias, noise
        self.rng = random.Random(seed)
        self.a_id, self.b_id = (tokenizer.encode(x, add_special_tokens=False)[0] for x in labels)
        self.dummy = nn.Parameter(torch.zeros(()))       # gives the module a device

    def forward(self, ids: torch.Tensor, *args, **kwargs):
        text = self.tokenizer.decode(ids[0].tolist())
        a = text.split("Response A:")[1].split("\n")[0]
        b = text.split("Response B:")[1].split("\n")[0]
        d = self.scale * (true_reward_one(a) - true_reward_one(b)) + self.bias + self.rng.gauss(0, self.noise)
        logits = torch.zeros(1, ids.shape[1], self.tokenizer.vocab_size)
        logits[0, -1, self.a_id] = d
        return SimpleNamespace(logits=logits)


def sft_batches(rows: Sequence[dict], tokenizer, batch_size: int, seed: int = 0):
    """Endless shuffled batches {"input_ids", "attention_mask", "labels"} (−100 on prompt and padding)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = []
    for r in rows:
        p = tokenizer.encode(r["prompt"], add_special_tokens=False)
        c = tokenizer.encode(r["completion"], add_special_tokens=False) + eos
        encoded.append((p + c, [-100] * len(p) + c))
    rng = random.Random(seed)
    while True:
        chunk = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(len(ids) for ids, _ in chunk)
        yield {"input_ids": torch.tensor([ids + [tokenizer.pad_id] * (width - len(ids)) for ids, _ in chunk]),
               "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
               "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])}


def train_sft(model, tokenizer, rows: Sequence[dict], *, steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
              out_dir: str = "runs/toy_sft", seed: int = 0, progress: bool = False):
    """Fit `model` to the rows' completions (the SFT stage of the toy pipeline)."""
    from ..objectives.clm import clm_loss
    from ..train import TrainConfig, Trainer
    config = TrainConfig(lr=lr, max_steps=steps, warmup_steps=min(20, steps // 10), out_dir=out_dir, seed=seed,
                         log_every=max(1, steps // 5), save_every=0, progress=progress, plot=False,
                         tensorboard=False)
    return Trainer(model, clm_loss, sft_batches(rows, tokenizer, batch_size, seed), config=config).fit()


def tiny_policy(tokenizer, *, d_model: int = 64, n_layers: int = 2, seed: int = 0, max_seq_len: int = 96):
    """A fresh tiny Llama for the toy (character tokenizer vocabulary)."""
    from ..model import build_model
    from ..presets import get_preset
    torch.manual_seed(seed)
    config = get_preset("llama-tiny", vocab_size=tokenizer.vocab_size, d_model=d_model, n_layers=n_layers,
                    n_heads=4, n_kv_heads=4, d_ff=4 * d_model, max_seq_len=max_seq_len,
                    pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_token_id)
    return build_model(config, "causal_lm")


def held_out_accuracy(reward_model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> float:
    """Fraction of pairs whose chosen response the reward model scores higher."""
    from .data import PreferenceBatches, tokenize_rows
    from ..model.modes import evaluating
    examples = tokenize_rows(rows, tokenizer, max_length=reward_model.config.max_seq_len)
    hits = 0
    with evaluating(reward_model):
        for batch in PreferenceBatches(examples, batch_size, tokenizer.pad_id, shuffle=False).fixed():
            scores = reward_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits   # (2b,)
            b = scores.shape[0] // 2
            hits += int((scores[:b] > scores[b:]).sum())
    return hits / len(examples)



def train_reward_model(backbone, tokenizer, rows: Sequence[dict], *, steps: int = 200, batch_size: int = 32,
                       lr: float = 1e-3, out_dir: str = "runs/toy_rm", seed: int = 0, soft_labels: bool = False):
    """A Bradley-Terry reward model on a copy of `backbone`'s trunk (`reward_model_from`), trained on
    preference rows (with their soft "label" when soft_labels=True). Returns the ValueModel."""
    import copy
    from ..train import TrainConfig, Trainer
    from .data import PreferenceBatches, tokenize_rows
    from .objectives import RewardObjective, reward_model_from
    model = reward_model_from(copy.deepcopy(backbone))
    rows = rows if soft_labels else [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    examples = tokenize_rows(rows, tokenizer, max_length=model.config.max_seq_len)
    config = TrainConfig(lr=lr, max_steps=steps, warmup_steps=min(20, steps // 10), out_dir=out_dir, seed=seed,
                         log_every=max(1, steps // 5), save_every=0, progress=False, plot=False, tensorboard=False)
    Trainer(model, RewardObjective().loss, PreferenceBatches(examples, batch_size, tokenizer.pad_id, seed=seed),
            config=config).fit()
    return model.eval()
