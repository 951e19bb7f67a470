"""The one error type of llmkit.data."""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data source or data setting is wrong; the message names the file/field/value and what was expected."""
