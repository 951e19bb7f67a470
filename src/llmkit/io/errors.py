"""Errors raised while reading or writing checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used as it is; the message names the file, the key, the expected
    and the found value. Raised before any weight is copied, so no model is ever half-loaded."""
