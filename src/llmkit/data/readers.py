"""File readers: the texts behind iter_texts (txt whole / lines / paragraphs, jsonl(.gz), tsv/csv, parquet),
and whole row tables for fine-tuning, contrastive and preference data (`read_records`)."""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError

__all__ = ["iter_files", "read_records"]


def iter_files(paths: list[Path], text_field: str, mode: str) -> Iterator[str]:
    for path in paths:
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".json")):
            yield from _iter_jsonl(path, text_field)
        elif name.endswith((".tsv", ".csv")):
            yield from _iter_table(path, text_field)
        elif name.endswith(".parquet"):
            yield from _iter_parquet(path, text_field)
        else:
            yield from _iter_txt(path, mode)


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _iter_txt(path: Path, mode: str) -> Iterator[str]:
    with _open_text(path) as f:
        if mode == "document":
            text = f.read()
            if text:
                yield text
        elif mode == "lines":
            for line in f:
                line = line.rstrip("\r\n")
                if line:
                    yield line
        else:  # paragraphs: runs of non-blank lines
            for nonblank, lines in itertools.groupby(f, key=lambda line: bool(line.strip())):
                if nonblank:
                    yield "".join(lines).rstrip("\r\n")


def _field(record: Any, text_field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(f"{where}: missing field {text_field!r} (fields present: {sorted(record)[:20]}); "
                        "set text_field= to the field holding the text")
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def _json_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(kind, number, record): a .json file holding one JSON array gives ("record", i, item) numbered
    from 0; anything else is JSON Lines, ("line", n, value) per non-blank line numbered from 1."""
    with _open_text(path) as f:
        if path.name.lower().removesuffix(".gz").endswith(".json"):
            is_array = f.read(4096).lstrip().startswith("[")
            f.seek(0)
            if is_array:
                try:
                    records = json.load(f)
                except json.JSONDecodeError as err:
                    raise DataError(f"'{path}': not valid JSON ({err})") from err
                yield from (("record", i, record) for i, record in enumerate(records))
                return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"'{path}' line {lineno}: not valid JSON ({err.msg})") from err
                yield "line", lineno, record


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for kind, number, record in _json_records(path):
        text = _field(record, text_field, f"'{path}' {kind} {number}")
        if text:
            yield text


def _table_reader(f, name: str) -> csv.DictReader:
    """A TSV is read without quoting, as GLUE writes it (SST-2's sentences hold quote characters)."""
    tsv = name.endswith(".tsv")
    return csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)


def _iter_table(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        reader = _table_reader(f, path.name.lower())
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise DataError(f"'{path}': no column {text_field!r} in the header (columns: {reader.fieldnames}); "
                            "set text_field= to the column holding the text")
        for row in reader:
            text = row.get(text_field)
            if text:
                yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow comes with datasets
        raise DataError(f"'{path}': reading parquet needs pyarrow (pip install pyarrow)") from err
    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"'{path}': no column {text_field!r} (columns: {columns}); set text_field=")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def read_records(path: Path) -> tuple[list, list[int]]:
    """All rows of a table file -> (rows, their 1-based line numbers, for error messages).

    .tsv / .csv (optionally .gz): dicts keyed by the header (data rows numbered from 1). .json holding
    one array: its items (numbered from 0). Anything else is JSON Lines (.jsonl, .jsonl.gz)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".tsv", ".csv")):
        with _open_text(path) as f:
            records = list(_table_reader(f, name))
        return records, list(range(1, len(records) + 1))
    rows = list(_json_records(path))
    return [record for _, _, record in rows], [number for _, number, _ in rows]
