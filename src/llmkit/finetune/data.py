"""Fine-tuning data: rows from files or HF `datasets`, mapped onto one of four shapes.

Sources: a path to a `.jsonl` / `.json` / `.csv` / `.tsv` file (`.gz` allowed), a list of row
dicts, an HF `datasets.Dataset`, or `{hf: name_or_path, split: train, name: config}` (a folder
written by `save_to_disk`, or anything `datasets.load_dataset` reads). `{path: file, columns: {...}}`
gives one source its own column mapping.

Shapes (`data.columns` maps our column names onto the source's, e.g. `{text: sentence}`):

    prompt_response   {"prompt", "response"} (+ optional "system")      instruction SFT
    messages          {"messages": [{"role", "content"}, ...]}          chat SFT
    text_label        {"text", "label"} (+ optional "text_pair")        sequence classification
    tokens_tags       {"tokens": [...], "tags": [...]}                  token classification

Every row keeps where it came from (file and line or row number), so a bad value is reported as
"'dev.tsv' row 17: label '3' never appears in train" rather than as a shape error deep in a batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..data.errors import DataError
from ..data.readers import read_records

SHAPES = {
    "prompt_response": (("prompt", "response"), ("system",)),
    "messages": (("messages",), ()),
    "text_label": (("text", "label"), ("text_pair",)),
    "tokens_tags": (("tokens", "tags"), ()),
}
DEFAULT_SHAPE = {"sequence_classification": "text_label", "token_classification": "tokens_tags"}


@dataclass
class Row:
    values: dict          # our column names -> values
    where: str            # "'train.tsv' row 17"


# ---- reading ---------------------------------------------------------------------------------
def read_source(source: Any, split: str = "train") -> tuple[list[dict], list[str], str]:
    """(records, locations, description) of a source; locations name each record for errors."""
    if isinstance(source, dict) and "path" in source:
        source = source["path"]
    if isinstance(source, dict) and "hf" in source:
        return _read_hf(_load_hf(source, split), f"{split} dataset {source['hf']!r}")
    if type(source).__module__.split(".")[0] == "datasets":
        return _read_hf(source, f"{split} dataset")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data.{split}={str(source)!r}: file not found (expected a .jsonl, .json, .csv or "
                            ".tsv file, a list of rows, or {{hf: name}})")
        records, lines = read_records(path)
        unit = "row" if path.name.lower().endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")) else "line"
        return records, [f"'{path.name}' {unit} {n}" for n in lines], f"'{path}'"
    if isinstance(source, (list, tuple)):
        for i, record in enumerate(source):
            if not isinstance(record, dict):
                raise DataError(f"data.{split}[{i}]: expected a row mapping, found {type(record).__name__}")
        return list(source), [f"{split} row {i}" for i in range(len(source))], f"{split} rows"
    raise DataError(f"data.{split}={source!r}: expected a path, a list of row dicts, an HF Dataset or {{hf: name}}")


def _load_hf(spec: dict, split: str):
    unknown = set(spec) - {"hf", "split", "name", "columns"}
    if unknown:
        raise DataError(f"data.{split}={spec!r}: unknown keys {sorted(unknown)}; expected hf, split, name, columns")
    import datasets  # optional dependency: imported only when a recipe asks for it
    where = Path(str(spec["hf"]))
    if where.is_dir() and ((where / "dataset_info.json").is_file() or (where / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(where))
    else:
        ds = datasets.load_dataset(spec["hf"], spec.get("name"), split=spec.get("split", split))
    if isinstance(ds, datasets.DatasetDict):
        name = spec.get("split", split)
        if name not in ds:
            raise DataError(f"data.{split}: dataset {spec['hf']!r} has splits {list(ds)}, not {name!r}")
        ds = ds[name]
    return ds


def _read_hf(ds: Any, what: str) -> tuple[list[dict], list[str], str]:
    kind = type(ds).__name__
    if kind.endswith("Dict"):
        raise DataError(f"{what}: got a {kind} with splits {list(ds)}; pass one split, e.g. ds['train']")
    records = [dict(r) for r in ds]
    return records, [f"{what} row {i}" for i in range(len(records))], what


# ---- shapes and column mapping ---------------------------------------------------------------
def resolve_shape(fmt: str, task: str, columns: Sequence[str], mapping: dict) -> str:
    if fmt != "auto":
        return fmt
    if task in DEFAULT_SHAPE:
        return DEFAULT_SHAPE[task]
    return "messages" if mapping.get("messages", "messages") in columns else "prompt_response"


def map_rows(records: list[dict], locations: list[str], shape: str, mapping: dict, what: str) -> list[Row]:
    """Rename the source's columns to the shape's names; a missing column is an error naming it."""
    required, optional = SHAPES[shape]
    unknown = set(mapping) - set(required) - set(optional)
    if unknown:
        raise DataError(f"data.columns: {sorted(unknown)} are not columns of the {shape} shape; expected keys "
                        f"among {list(required + optional)}")
    rows = []
    for record, where in zip(records, locations):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
        values = {}
        for name in required + optional:
            column = mapping.get(name, name)
            if column not in record or record[column] is None:
                if name in optional:
                    continue
                hint = f" (data.columns.{name}={column!r})" if name in mapping else \
                    f"; map another column onto it with data.columns.{name}=<column>"
                raise DataError(f"{where}: missing column {column!r}{hint}; columns found: {sorted(record)}")
            values[name] = record[column]
        rows.append(Row(values, where))
    if not rows:
        raise DataError(f"{what}: no rows")
    return rows


def load_rows(source: Any, split: str, shape_fmt: str, task: str, mapping: dict,
              limit: Optional[int] = None, seed: int = 0) -> tuple[list[Row], str]:
    """Read, map and (with `limit`) take a seeded random subset of a source: (rows, shape).
    A source given as {path: ..., columns: {...}} (or {hf: ..., columns: {...}}) maps its own
    columns on top of `mapping` (e.g. SST-2's dev file calls `sentence` `content`)."""
    if isinstance(source, dict):
        unknown = set(source) - {"path", "columns"} if "path" in source else set()
        if unknown or not ("path" in source or "hf" in source):
            raise DataError(f"data.{split}={source!r}: expected {{path: file, columns: {{...}}}} or "
                            "{hf: name, split: ..., columns: {...}}")
        mapping = {**mapping, **source.get("columns", {})}
    records, locations, what = read_source(source, split)
    if not records:
        raise DataError(f"{what}: no rows")
    shape = resolve_shape(shape_fmt, task, list(records[0]) if isinstance(records[0], dict) else [], mapping)
    rows = map_rows(records, locations, shape, mapping, what)
    if limit is not None and limit < len(rows):
        index = sorted(random.Random(f"{seed}|{split}").sample(range(len(rows)), limit))
        rows = [rows[i] for i in index]
    return rows, shape


def split_off(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, dev): a seeded `fraction` of rows held out as dev."""
    order = list(range(len(rows)))
    random.Random(f"{seed}|dev").shuffle(order)
    n_dev = max(1, int(round(len(rows) * fraction)))
    dev = set(order[:n_dev])
    return [r for i, r in enumerate(rows) if i not in dev], [r for i, r in enumerate(rows) if i in dev]


# ---- labels ----------------------------------------------------------------------------------
def _label_key(value: Any, where: str, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: column {column!r} = {value!r}: expected a label (a string or an integer)")
    return str(value).strip()


class LabelVocab:
    """Label names <-> ids. Built from the training labels (numeric names sort as numbers), so
    a dev or test label that never occurs in train is an error naming its row, not a silent id."""

    def __init__(self, names: Sequence[str], origin: str = "data.labels"):
        self.names = [str(n) for n in names]
        self.origin = origin
        if len(set(self.names)) != len(self.names):
            raise DataError(f"data.labels={self.names}: labels must be distinct")
        self.index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_rows(cls, rows: list[Row], column: str) -> "LabelVocab":
        seen = set()
        for row in rows:
            values = row.values[column] if column == "tags" else [row.values[column]]
            seen.update(_label_key(v, row.where, column) for v in values)
        numeric = all(s.lstrip("-").isdigit() for s in seen)
        names = sorted(seen, key=(lambda s: int(s)) if numeric else None)
        if len(names) < 2 and column == "label":
            raise DataError(f"train: column 'label' holds only {names}: a classifier needs at least two labels")
        return cls(names, origin="train")

    def encode(self, value: Any, where: str, column: str, split: str) -> int:
        key = _label_key(value, where, column)
        if key not in self.index:
            shown = self.names if len(self.names) <= 20 else self.names[:20] + ["..."]
            raise DataError(f"{where}: {split} label {key!r} (column {column!r}) never appears in {self.origin} "
                            f"({self.origin} labels: {shown}); a model cannot learn a class it has no example of")
        return self.index[key]
