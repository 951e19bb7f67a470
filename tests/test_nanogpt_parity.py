"""recipes/shakespeare_char.yaml set against nanoGPT's formulas (karpathy/nanoGPT, model.py and train.py).

Issue 12 asked why llmkit ended this recipe ~0.02 above nanoGPT's val loss. What the investigation
found (benchmarks/results/shakespeare_char.md has the figures): nanoGPT's 1.886 was its own 20-batch
estimate at one seed, which for that run reads 0.014 below the 200-batch estimate of the same
weights; over three seeds each the 200-batch means are 0.005 apart, inside the seed spread.
nanoGPT's own GPT class trained by llmkit's Trainer ends at llmkit's loss to 1e-7, the 68-entry
vocabulary against nanoGPT's 65 moves the loss by 0.001 and nanoGPT's warmup (peak one update
later) by 0.002. Each part ruled out is pinned here, so a change that brings a difference in fails:
  - initial weights: N(0, 0.02) for every matrix and embedding, 0.02 / sqrt(2 L) for the residual
    projections (attention output, MLP down: GPT-2's scaled init), LayerNorm gains 1, no biases;
  - weight decay on exactly the matrices and embeddings (dim >= 2), never on the gains;
  - the learning rate of every update within lr / (W + 1) of nanoGPT's get_lr;
  - the vocabulary's extra (special) ids never occur in the text, so they are never a target.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from llmkit.pretrain import build_pretrain_model, parse_recipe, pretrain_tokenizer
from llmkit.recipes import load_yaml
from llmkit.train import lr_at, parameter_groups

ROOT = Path(__file__).resolve().parent.parent
TEXT = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def recipe():
    data = load_yaml(ROOT / "recipes" / "shakespeare_char.yaml")
    data["data"]["source"] = str(TEXT)
    return parse_recipe(data)


@pytest.fixture(scope="module")
def tokenizer(recipe):
    return pretrain_tokenizer(recipe.data, str(TEXT))


@pytest.fixture(scope="module")
def model(recipe, tokenizer):
    torch.manual_seed(0)
    return build_pretrain_model(recipe.model, tokenizer)


def nanogpt_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """nanoGPT train.py get_lr(it): the lr of iteration it (0-based), i.e. of update it + 1."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_initial_weights_follow_nanogpt_init(model, recipe):
    n_layers = recipe.model.n_layers
    residual_std = 0.02 / math.sqrt(2 * n_layers)                  # 0.00707 for 4 layers
    seen = 0
    for name, param in model.named_parameters():
        assert not name.endswith(".bias"), f"{name}: nanoGPT (bias=False) has no biases"
        if param.dim() == 1:                                       # LayerNorm gains
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        want = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        std, mean = param.std().item(), param.mean().item()
        assert std == pytest.approx(want, rel=0.05), (name, std, want)   # >= 8704 draws: sd of std ~1%
        assert abs(mean) < 0.1 * want, (name, mean)
        seen += 1
    # embeddings (tokens, positions), then per layer q, k, v, o, up, down
    assert seen == 2 + 6 * n_layers
    assert model.lm_head.weight is model.transformer.embed_tokens.weight     # tied, as nanoGPT's wte


def test_weight_decay_groups_are_nanogpts(model, recipe):
    groups = {g["group"]: g for g in parameter_groups(model, recipe.train.weight_decay)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.dim() >= 2), name       # nanoGPT: p.dim() >= 2 decays
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert id(model.transformer.embed_positions.weight) in decayed


def test_learning_rate_of_every_update_stays_within_one_warmup_step_of_nanogpts(recipe):
    cfg = recipe.train
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == (1e-3, 1e-4, 100, 2000)
    tolerance = cfg.lr / (cfg.warmup_steps + 1)
    worst = 0.0
    for update in range(1, cfg.max_steps + 1):
        ours = lr_at(update, cfg)
        theirs = nanogpt_lr(update - 1, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        worst = max(worst, abs(ours - theirs))
    assert worst <= tolerance + 1e-12, worst
    # the peak and the floor are the same values; llmkit reaches the peak one update earlier
    assert lr_at(cfg.warmup_steps, cfg) == cfg.lr == pytest.approx(nanogpt_lr(cfg.warmup_steps, 1e-3, 1e-4, 100, 2000))
    assert lr_at(cfg.max_steps, cfg) == pytest.approx(cfg.min_lr)
    # after warmup the two differ by at most one update's worth of cosine decay
    decay_worst = max(abs(lr_at(n, cfg) - nanogpt_lr(n - 1, 1e-3, 1e-4, 100, 2000)) for n in range(102, 2001))
    assert decay_worst <= (cfg.lr - cfg.min_lr) * math.pi / (2 * (cfg.max_steps - cfg.warmup_steps))


def test_the_special_ids_never_occur_in_the_text(tokenizer):
    text = TEXT.read_text(encoding="utf-8")
    ids = set(tokenizer.encode(text, add_special_tokens=False))
    chars = sorted(set(text))
    assert len(chars) == 65 and len(ids) == 65                            # nanoGPT's vocabulary
    specials = set(range(tokenizer.vocab_size)) - ids
    assert len(specials) == tokenizer.vocab_size - 65 == 3                # <pad>, <|endoftext|>, <unk>
    assert tokenizer.decode(sorted(ids)) == "".join(chars)
