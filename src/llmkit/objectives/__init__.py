"""Pretraining objectives: `loss, metrics = objective.loss(model, batch)`; the Trainer knows nothing else.

`OBJECTIVES` maps a recipe's `objective:` name to a factory of an `Objective` (see base.py):
the collator/data builder, the loss and the model head it needs. A recipe may also give a weighted
mix, `objective: {mlm: 1.0, nsp: 1.0}`, trained as L = Σ w_i L_i (`WeightedMix`).
"""
from .base import MixedBatches, Objective, ObjectiveData, WeightedMix, build_once
from .clm import IGNORE_INDEX, CausalLMObjective, clm_loss
from .dae import DenoisingObjective
from .mlm import MaskedLMObjective, mask_tokens, mlm_loss
from .mmlm import MaskedMultimodalObjective
from .nsp import BertObjective, NextSentenceObjective, nsp_loss

OBJECTIVES = {"clm": CausalLMObjective, "mlm": MaskedLMObjective, "nsp": NextSentenceObjective,
              "bert": BertObjective, "mmlm": MaskedMultimodalObjective, "dae": DenoisingObjective}


def make_objective(spec):
    """A name ("clm") or a {name: weight} mapping -> an Objective (a WeightedMix for several)."""
    if isinstance(spec, str):
        spec = {spec: 1.0}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"objective={spec!r}: expected a name or a mapping of name -> weight")
    unknown = [name for name in spec if name not in OBJECTIVES]
    if unknown:
        raise ValueError(f"objective={unknown[0]!r}: expected one of {sorted(OBJECTIVES)}")
    objectives = {name: OBJECTIVES[name]() for name in spec}
    if len(objectives) == 1:
        return next(iter(objectives.values()))
    return WeightedMix(objectives, {name: float(w) for name, w in spec.items()})


__all__ = ["DenoisingObjective", "MaskedMultimodalObjective", "mask_tokens", "mlm_loss", "nsp_loss", "MaskedLMObjective", "NextSentenceObjective",
           "BertObjective", "clm_loss", "IGNORE_INDEX", "OBJECTIVES", "CausalLMObjective", "Objective", "ObjectiveData",
           "WeightedMix", "MixedBatches", "build_once", "make_objective"]
