"""Alignment: reward models, DPO (with cDPO and hinge), IPO, KTO and ORPO offline; PPO-RLHF, RLAIF and
Constitutional AI online.

    from llmkit.align import DPOObjective, frozen_copy, tokenize_rows, normalize_rows, PreferenceBatches
    examples = tokenize_rows(normalize_rows(rows), tokenizer, max_length=256)
    batches = PreferenceBatches(examples, batch_size=8, pad_id=tokenizer.pad_id)
    Trainer(model, DPOObjective(frozen_copy(model), beta=0.1).loss, batches, config=...).fit()

logps.py: `sequence_logps` (log π(y|x) from logits) and its head-on-completions-only forward;
losses.py: the pure loss formulas; data.py: rows, tokenizing, batches; objectives.py: the
Trainer objectives; on_policy.py: preference pairs from the model's own wrong answers; recipe.py:
`llmkit align recipe.yaml`; demo_stage.py: the demo's preference stage; ppo_math.py: PPO's pure
functions (KL estimators, reward placement, GAE, whitening, clipped losses, KL controllers);
judge.py: an AI judge's P(A ≻ B), averaged over both orders (RLAIF); score_judge.py: an AI judge's
1-10 score mapped to [-1, 1], a text reward for PPO (d-RLAIF); constitution.py + constitution.yaml:
the principles of Constitutional AI; cai.py: SL-CAI (critique, revise, SFT on the revisions) and
RL-CAI (soft harmlessness labels from an ensemble of principle judges). Online RL: rollout.py
(sampling, masks, log-probs at the sampling temperature), rewards.py (reward model or text reward),
ppo.py (PPOTrainer on the Trainer), ppo_recipe.py / cai_recipe.py (`llmkit align method=ppo | cai`),
toy_reviews.py (a task with a known true reward), demo_ppo.py (the demo's PPO stage).
"""
from .constitution import Constitution, ConstitutionError, Principle, load_constitution
from .data import (PreferenceBatches, collate_pairs, collate_unpaired, first_human_turn, normalize_row,
                   normalize_rows, read_rows, split_dialogue, to_unpaired, tokenize_rows, truncate)
from .logps import causal_lm_logps, mean_token_kl, sequence_logps, token_logps
from .losses import dpo_loss, ipo_loss, kto_loss, log1mexp, orpo_loss, preference_metrics, reward_loss
from .objectives import (ALIGN_METHODS, DPOObjective, IPOObjective, KTOObjective, ORPOObjective, RewardObjective,
                         frozen_copy, make_alignment_objective, precompute_reference_logps, reward_model_from)
from .score_judge import ScoreJudge, parse_score

__all__ = ["PreferenceBatches", "collate_pairs", "collate_unpaired", "normalize_row", "normalize_rows", "read_rows",
           "split_dialogue", "to_unpaired", "tokenize_rows", "truncate", "causal_lm_logps", "mean_token_kl",
           "sequence_logps", "token_logps", "dpo_loss", "ipo_loss", "kto_loss", "log1mexp", "orpo_loss",
           "preference_metrics", "reward_loss", "ALIGN_METHODS", "DPOObjective", "IPOObjective", "KTOObjective",
           "ORPOObjective", "RewardObjective", "frozen_copy", "make_alignment_objective", "precompute_reference_logps",
           "reward_model_from", "AlignRecipe", "run_align", "preference_stage", "on_policy_pairs", "complete",
           "first_human_turn", "ScoreJudge", "parse_score", "Constitution", "ConstitutionError", "Principle",
           "load_constitution", "critique_and_revise", "revision_examples", "sl_cai_sft", "harmlessness_labels",
           "principle_judges"]

_CAI = ("critique_and_revise", "revision_examples", "sl_cai_sft", "harmlessness_labels", "principle_judges")


def __getattr__(name):  # the recipe and demo pull in the Trainer and generation: import them on use
    if name in ("AlignRecipe", "run_align"):
        from . import recipe
        return getattr(recipe, name)
    if name == "preference_stage":
        from .demo_stage import preference_stage
        return preference_stage
    if name in _CAI:
        from . import cai
        return getattr(cai, name)
    if name in ("on_policy_pairs", "complete"):
        from . import on_policy
        return getattr(on_policy, name)
    raise AttributeError(f"module 'llmkit.align' has no attribute {name!r}")
