"""`with evaluating(model) as device:` eval mode and no_grad for a block, the model's mode restored
after (evaluation, generation and reference passes all run this way)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)
