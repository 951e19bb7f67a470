"""The one error type of llmkit.compress: it names the field, the value and what was expected."""
from __future__ import annotations


class CompressError(ValueError):
    """Bad compression input (scheme, group size, sparsity, calibration, architecture)."""
