"""`with evaluating(model) as device:` eval mode and no_grad for a block, the model's mode restored
after (evaluation, generation and reference passes all run this way)."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

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


def eval_mode(model: nn.Module):
    """`evaluating(model)` for a model in training mode; nothing for one already in eval mode (an
    inference engine's per-step case: the recursive .eval() / .train() over every submodule was a
    fifth of a small model's decode step). Gradients are the caller's business (inference_mode)."""
    return evaluating(model) if model.training else nullcontext()
