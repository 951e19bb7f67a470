"""Recipe validation: unknown keys name the closest valid key, wrong types name the field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from llmkit.recipes import RecipeError, apply_overrides, build, load_yaml, to_yaml


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: str = "cosine"
    clip: Optional[float] = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"Inner.schedule={self.schedule!r}: expected 'cosine' or 'linear'")


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    train: Inner = field(default_factory=Inner)
    note: Optional[str] = None
    extra: dict = field(default_factory=dict)


def test_builds_nested_sections_with_coercion():
    recipe = build(Outer, {"steps": 5, "train": {"lr": 1, "betas": [0.9, 0.95], "clip": None}})
    assert recipe.steps == 5 and recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.train.betas == (0.9, 0.95) and recipe.train.clip is None
    assert build(Outer, {"train": {"lr": "3e-4"}}).train.lr == 3e-4  # YAML 1.1 reads 3e-4 as a str


def test_unknown_key_names_it_and_the_closest():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.lrr'; did you mean 'lr'"):
        build(Outer, {"train": {"lrr": 0.1}})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'stpes'; did you mean 'steps'"):
        build(Outer, {"stpes": 3})


@pytest.mark.parametrize("data, message", [
    ({"steps": "ten"}, r"steps='ten': expected int, found str"),
    ({"steps": 2.5}, r"steps=2.5: expected int"),
    ({"train": {"lr": "fast"}}, r"train.lr='fast': expected float"),
    ({"train": {"betas": 0.9}}, r"train.betas=0.9: expected a list"),
    ({"train": {"clip": "no"}}, r"train.clip='no'"),
    ({"train": 3}, r"train: expected a mapping"),
    ({"train": {"schedule": "step"}}, r"train: Inner.schedule='step': expected 'cosine' or 'linear'"),
])
def test_wrong_types_name_the_field(data, message):
    with pytest.raises(RecipeError, match=message):
        build(Outer, data)


def test_overrides_and_yaml_roundtrip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: demo\ntrain:\n  lr: 0.01\n")
    data = apply_overrides(load_yaml(path), ["train.lr=1e-4", "steps=7", "train.betas=[0.8,0.9]"])
    recipe = build(Outer, data)
    assert (recipe.train.lr, recipe.steps, recipe.train.betas) == (1e-4, 7, (0.8, 0.9))
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(recipe))
    assert build(Outer, load_yaml(again)) == recipe
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(RecipeError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_overrides_read_values_by_the_field_type():
    words = ["name=Question: what is 2+2? Answer:", "note=null", "steps=7", "train.lr=1e-4", "train.clip=null",
             "train.betas=[0.8, 0.9]", "extra={a: 1}", "train.schedule=linear"]
    recipe = build(Outer, apply_overrides({}, words, Outer))
    assert recipe.name == "Question: what is 2+2? Answer:" and recipe.note is None and recipe.steps == 7
    assert (recipe.train.lr, recipe.train.clip, recipe.train.betas) == (1e-4, None, (0.8, 0.9))
    assert recipe.extra == {"a": 1} and recipe.train.schedule == "linear"
    text = apply_overrides({}, ["name=123", "note=[x]", "train.schedule=null"], Outer)
    assert text == {"name": "123", "note": "[x]", "train": {"schedule": "null"}}   # text fields: the text
    assert apply_overrides({}, ["name=123", "stpes=3"]) == {"name": 123, "stpes": 3}  # no schema: YAML
    with pytest.raises(RecipeError, match=r"override 'steps=\[1': value is not valid YAML"):
        apply_overrides({}, ["steps=[1"], Outer)
    with pytest.raises(RecipeError, match=r"steps='x': expected int"):
        build(Outer, apply_overrides({}, ["steps=x"], Outer))
