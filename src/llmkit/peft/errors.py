"""The one error type of llmkit.peft: bad method options, targets, or adapter files."""
from __future__ import annotations


class PeftError(ValueError):
    """A PEFT option, target or adapter file that cannot be used; the message names it."""
