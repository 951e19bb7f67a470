"""Pretraining objectives: `loss, metrics = objective.loss(model, batch)`; the Trainer knows nothing else.

`OBJECTIVES` maps a recipe's `objective:` name to a factory of an `Objective` (see base.py):
the collator/data builder, the loss and the model head it needs. A recipe may also give a weighted
mix, `objective: {mlm: 1.0, nsp: 1.0}`, trained as L = Σ w_i L_i (`WeightedMix`).
"""
from .base import Objective, ObjectiveData, WeightedMix, build_once
from .clm import IGNORE_INDEX, CausalLMObjective, clm_loss
from .contrastive import ContrastiveObjective
from .dae import DenoisingObjective
from .mlm import MaskedLMObjective, mask_tokens, mlm_loss
from .mmlm import MaskedMultimodalObjective
from .nsp import BertObjective, NextSentenceObjective, nsp_loss

OBJECTIVES = {"clm": CausalLMObjective, "mlm": MaskedLMObjective, "nsp": NextSentenceObjective,
              "bert": BertObjective, "mmlm": MaskedMultimodalObjective, "dae": DenoisingObjective,
              "contrastive": ContrastiveObjective}


def make_objective(spec):
    """A name ("clm"), or a mapping name -> weight, or name -> {weight: w, **options} (options go
    to the objective's constructor, e.g. {dae: {noise: [span_infilling], mask_ratio: 0.3}})
    -> an Objective (a WeightedMix for several)."""
    if isinstance(spec, str):
        spec = {spec: 1.0}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"objective={spec!r}: expected a name or a mapping of name -> weight")
    objectives, weights = {}, {}
    for name, value in spec.items():
        if name not in OBJECTIVES:
            raise ValueError(f"objective={name!r}: expected one of {sorted(OBJECTIVES)}")
        options = dict(value) if isinstance(value, dict) else {"weight": value}
        weights[name] = options.pop("weight", 1.0)
        if isinstance(weights[name], bool) or not isinstance(weights[name], (int, float)):
            raise ValueError(f"objective {name}.weight={weights[name]!r}: expected a number")
        try:
            objectives[name] = OBJECTIVES[name](**options)
        except TypeError as exc:
            raise ValueError(f"objective {name}: options {sorted(options)}: {exc}") from exc
    if len(objectives) == 1:
        return next(iter(objectives.values()))
    return WeightedMix(objectives, {name: float(w) for name, w in weights.items()})


__all__ = ["ContrastiveObjective", "DenoisingObjective", "MaskedMultimodalObjective", "mask_tokens", "mlm_loss", "nsp_loss", "MaskedLMObjective", "NextSentenceObjective",
           "BertObjective", "clm_loss", "IGNORE_INDEX", "OBJECTIVES", "CausalLMObjective", "Objective", "ObjectiveData",
           "WeightedMix", "build_once", "make_objective"]
