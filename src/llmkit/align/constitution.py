"""A constitution for Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI
Feedback"): a list of principles, each with

    name         a short id (recorded with every critique and every label)
    critique     the critique request:  "Point out any way in which the reply could hurt ..."
    revision     the revision request:  "Rewrite the reply so that it can hurt no one ..."
    preference   the RL-CAI feedback question:  "Which of the two replies is less harmful?"

SL-CAI (`cai.critique_and_revise`) samples a principle per critique-revision round; RL-CAI
(`cai.harmlessness_labels`) samples an ensemble of principles per pair and asks each one's
preference question. `load_constitution()` reads the packaged default (constitution.yaml, written
for llmkit); `load_constitution(path)` a YAML or JSON file of the same shape:

    name: my-constitution          # optional
    principles:
      - {name: harm, critique: ..., revision: ..., preference: ...}
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

DEFAULT_PATH = Path(__file__).with_name("constitution.yaml")
FIELDS = ("name", "critique", "revision", "preference")


class ConstitutionError(ValueError):
    """A constitution file or mapping that does not have the expected shape."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    preference: str


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    name: str = ""

    def __len__(self) -> int:
        return len(self.principles)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.principles]

    def sample(self, rng: random.Random, k: int = 1) -> list[Principle]:
        """k distinct principles (all of them when k >= len), drawn with `rng`."""
        return rng.sample(list(self.principles), min(k, len(self.principles)))


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConstitutionError(f"{where}={value!r}: expected a non-empty string")
    return value.strip()


def _principle(raw: Any, where: str) -> Principle:
    if not isinstance(raw, dict):
        raise ConstitutionError(f"{where}={str(raw)[:60]!r}: expected a mapping with keys {list(FIELDS)}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConstitutionError(f"{where}: unknown key {unknown[0]!r}: expected only {list(FIELDS)}")
    missing = [k for k in FIELDS if k not in raw]
    if missing:
        raise ConstitutionError(f"{where}: missing {missing[0]!r}: expected every principle to have {list(FIELDS)}")
    return Principle(**{k: _text(raw[k], f"{where}.{k}") for k in FIELDS})


def constitution_from(data: Any, where: str = "constitution") -> Constitution:
    """A Constitution from a parsed mapping {name?, principles: [...]}; errors name the field."""
    if not isinstance(data, dict):
        raise ConstitutionError(f"{where}: found {type(data).__name__}: expected a mapping with a 'principles' list")
    unknown = sorted(set(data) - {"name", "principles"})
    if unknown:
        raise ConstitutionError(f"{where}: unknown key {unknown[0]!r}: expected 'principles' (and optionally 'name')")
    raw = data.get("principles")
    if not isinstance(raw, list) or not raw:
        raise ConstitutionError(f"{where}.principles={raw!r}: expected a non-empty list of principles")
    principles = tuple(_principle(p, f"{where}.principles[{i}]") for i, p in enumerate(raw))
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if p.name in seen:
            raise ConstitutionError(f"{where}.principles[{i}].name={p.name!r}: already used by principles"
                                    f"[{seen[p.name]}]: expected unique names")
        seen[p.name] = i
    name = data.get("name", "")
    if not isinstance(name, str):
        raise ConstitutionError(f"{where}.name={name!r}: expected a string")
    return Constitution(principles, name)


def load_constitution(path: Optional[Union[str, Path]] = None) -> Constitution:
    """The packaged default (path=None) or a .yaml / .yml / .json file."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.is_file():
        raise ConstitutionError(f"constitution={str(path)!r}: file not found (expected a .yaml or .json file)")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConstitutionError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    return constitution_from(data, str(path))
