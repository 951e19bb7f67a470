"""Recipes: YAML files that describe a job, validated against dataclasses before anything runs.

    llmkit pretrain recipes/shakespeare_char.yaml train.max_steps=500 model.d_model=256

A recipe maps onto a dataclass schema, section by section. Every key is checked: an unknown key
is an error naming it and the closest valid key; a value of the wrong type is an error naming the
dotted field, the value and the expected type. `key=value` overrides use dotted paths and YAML
syntax for the value (`train.lr=1e-3`, `train.betas=[0.9,0.95]`, `model.sliding_window=null`);
a text field takes its value as it is (`prompt=Question: 2+2? Answer:`).
"""
from __future__ import annotations

import dataclasses
import os
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class RecipeError(ValueError):
    """A recipe key or value that cannot be used; the message names the field."""


def load_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at the top, found {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str], schema: Optional[type] = None) -> dict:
    """Apply `a.b.c=value` strings onto a nested dict, in place. A value is YAML, except for a field
    of `schema` typed `str` / `Optional[str]`: that takes the text as it is (`null`: None)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        hint = schema  # the type of the field the key names, if the schema has it
        for part in parts:
            hint = typing.get_type_hints(hint).get(part) if dataclasses.is_dataclass(hint) else None
            if typing.get_origin(hint) in (Union, types.UnionType):     # Optional[Section]: the section
                hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        options = set(typing.get_args(hint)) if typing.get_origin(hint) in (Union, types.UnionType) else {hint}
        if options - {type(None)} == {str} or raw == "":
            value = None if raw == "null" and type(None) in options else raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise RecipeError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def build(schema: type, data: Any, where: str = "") -> Any:
    """Turn a nested mapping into the dataclass `schema`, checking every key and type."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, found {data!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(fields)}"
            raise RecipeError(f"unknown recipe key {dotted!r}{hint}")
        kwargs[key] = coerce(hints[key], value, dotted)
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as exc:  # a required field is missing; the dataclass's own validation
        raise RecipeError(f"{where or 'recipe'}: {exc}") from exc


def coerce(hint: Any, value: Any, dotted: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return coerce(option, value, dotted)
            except RecipeError as exc:
                error = exc
        raise error if len(options) == 1 else RecipeError(f"{dotted}={value!r}: expected {_name(hint)}")
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{dotted}={value!r}: expected one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, dotted)
    if hint in (list, tuple):  # a bare `tuple` / `list` annotation: any items
        origin = hint
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{dotted}={value!r}: expected a list ({_name(hint)})")
        inner = args[0] if args else Any
        items = [coerce(inner, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{dotted}={value!r}: expected a mapping")
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; accept plain numbers
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):    # a pathlib.Path from Python code: a path field's value
            return os.fspath(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise RecipeError(f"{dotted}={value!r}: expected {_name(hint)}, found {type(value).__name__}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_yaml(obj: Any) -> str:
    """The resolved recipe, as written into a run folder so the run can be repeated."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value
    return yaml.safe_dump(plain(obj), sort_keys=False)
