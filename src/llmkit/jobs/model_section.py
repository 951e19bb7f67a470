"""The one model section of every job: a checkpoint (`from`) or a preset with ModelConfig fields.

    model:
      from: path/to/folder        # a Hugging Face or llmkit folder, or package:NAME; no fields with it
      preset: llama-tiny          # or a preset built fresh, any ModelConfig field over it:
      d_model: 128

Every ModelConfig field is a key here (None = the preset's value), so `model.n_layers=4` is checked
like any recipe key and a bad value fails before data is read. Jobs that put a head on the model
(fine-tuning) subclass the section with their own keys.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Optional

from ..config import ConfigError, ModelConfig
from ..io.packaged import resolve_checkpoint
from ..presets import get_preset
from ..recipes import RecipeError

DEFAULT_PRESET = "gpt2-tiny"           # a section with neither `from` nor `preset`
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.init)


class _ModelSectionMethods:
    def __post_init__(self):
        if self.checkpoint is not None:
            self.checkpoint = resolve_checkpoint(self.checkpoint)
        if self.checkpoint is not None and self.preset is not None:
            raise ValueError(f"from={self.checkpoint!r} preset={self.preset!r}: expected one of them (a checkpoint "
                             "folder, or a preset to train from scratch)")
        if self.checkpoint is not None and self.overrides():
            raise ValueError(f"fields {sorted(self.overrides())} cannot change a checkpoint loaded with 'from'")
        if self.checkpoint is None:
            self.preset = self.preset or DEFAULT_PRESET
            get_preset(self.preset, **self.overrides())   # bad values fail now, before any data is read

    def overrides(self) -> dict:
        """The ModelConfig fields the section sets."""
        return {name: getattr(self, name) for name in CONFIG_FIELDS if getattr(self, name) is not None}

    def config(self, tokenizer=None) -> ModelConfig:
        """The preset with the section's fields; vocabulary and special ids from `tokenizer` unless set."""
        fields = self.overrides()
        if tokenizer is not None:
            fields.setdefault("vocab_size", tokenizer.vocab_size)
            fields.setdefault("eos_token_id", tokenizer.eos_token_id)
            fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        try:
            return get_preset(self.preset, **fields)
        except (ConfigError, ValueError) as exc:
            raise RecipeError(f"model: {exc}") from exc


_HINTS = typing.get_type_hints(ModelConfig)
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("checkpoint", Optional[str], dataclasses.field(default=None)),   # the recipe key `from`
     ("preset", Optional[str], dataclasses.field(default=None))]
    + [(name, Optional[_HINTS[name]], dataclasses.field(default=None)) for name in CONFIG_FIELDS],
    bases=(_ModelSectionMethods,), namespace={"__module__": __name__})


def rename_from(data: dict) -> dict:
    """A recipe mapping with `model.from` renamed to the field `model.checkpoint` (`from` is a keyword)."""
    model = data.get("model")
    if not isinstance(model, dict) or "from" not in model:
        return data
    if "checkpoint" in model:
        raise RecipeError("model: give `from` or `checkpoint`, not both (they are the same key)")
    model = {("checkpoint" if k == "from" else k): v for k, v in model.items()}
    return {**data, "model": model}
