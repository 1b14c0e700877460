"""Rows: the dicts that fine-tuning, classification and preference data start from.

One place reads them (local .json/.jsonl/.csv/.parquet files, a Hugging Face dataset id or folder,
or rows already in memory), picks their fields with errors that name the field, splits them into
training and validation rows, takes seeded subsets, and writes them back as JSON lines.
"""
from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Row files by extension, named as `datasets` builders.
ROW_FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(source: str | Path | Sequence[str | Path] | Sequence[Mapping[str, Any]],
              split: str = "train") -> Sequence[Mapping[str, Any]]:
    """Rows from local .json/.jsonl/.csv/.parquet files (paths or globs), a hub id or dataset folder; rows pass through."""
    files = [source] if isinstance(source, (str, Path)) else source
    if not (isinstance(files, (list, tuple)) and files and all(isinstance(file, (str, Path)) for file in files)):
        return source  # already rows: a list of dicts, or a datasets.Dataset
    files = [str(file) for file in files]
    try:
        import datasets  # only here: training from ready rows must not need it
    except ImportError:  # JSON and CSV files still load, e.g. on a GPU machine without datasets
        if all(Path(file).suffix in (".json", ".jsonl", ".csv") and Path(file).is_file() for file in files):
            return [row for file in files for row in read_plain_rows(Path(file))]
        raise
    builders = {ROW_FILE_KINDS.get(Path(file).suffix) for file in files}
    if builders == {None} and len(files) == 1:
        return datasets.load_dataset(files[0], split=split)
    if None in builders or len(builders) > 1:
        raise ValueError(f"cannot load {files}: give .json/.jsonl/.csv/.parquet files of one kind, one hub id "
                         "or dataset folder, or a list of dicts")
    return datasets.load_dataset(builders.pop(), data_files=files, split="train")


def read_plain_rows(file: Path) -> list[dict[str, Any]]:
    """The rows of a JSON array, JSON-lines or CSV (with a header) file, read with the standard library."""
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if file.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Rows as JSON lines, which load_rows reads with the standard library alone (where `datasets` is missing)."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def split_rows(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Numbers of the training rows and of a seeded random choice of validation rows, each in order."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    held = set(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:round(count * val_fraction)]
               .tolist())
    return [i for i in range(count) if i not in held], sorted(held)


def sample_rows(rows: Sequence[Any], count: int | None, seed: int = 0) -> list[Any]:
    """A seeded random choice of `count` rows, in their original order; all of them when count is None or
    not below their number."""
    if count is None or count >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), count))]


def text_of(row: Mapping[str, Any], field: str, required: bool = True) -> str:
    """The string in row[field]; an optional field that is missing or None is ""."""
    if field not in row and required:
        raise ValueError(f"missing field {field!r} (fields present: {field_names(row)})")
    value = row.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def field_names(row: Mapping[str, Any]) -> str:
    """The row's field names, quoted, for error messages."""
    return ", ".join(repr(key) for key in row) or "none"
