"""Pretraining objectives: `loss, metrics = objective(model, batch)`; the Trainer knows nothing else."""
from .clm import IGNORE_INDEX, clm_loss

OBJECTIVES = {"clm": clm_loss}

__all__ = ["clm_loss", "IGNORE_INDEX", "OBJECTIVES"]
