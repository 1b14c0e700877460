"""Rows: the dicts that fine-tuning, classification and preference data start from.

One place reads them (local .json/.jsonl/.csv/.parquet files, a Hugging Face dataset id or folder,
or rows already in memory), picks their fields with errors that name the field, splits them into
training and validation rows, takes seeded subsets, and writes them back as JSON lines.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# The repository's data/ folder: where `python3 data/download.py NAME` writes each dataset's NAME/ folder,
# and where the experiments and the evaluation tasks look for their data by default.
PROJECT_DATA = Path(__file__).resolve().parents[1] / "data"

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
    for file in files:
        if Path(file).is_dir():
            raise ValueError(f"{file} is a folder; pass the .json/.jsonl/.csv/.parquet files in it, or a glob")
        if Path(file).suffix != ".parquet" and Path(file).is_file():
            check_utf8(Path(file))  # datasets would fail only when the row is read, naming no file
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except OSError:  # a missing file: datasets' message names it
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow, json and StopIteration errors that name no file)
        raise unreadable(files, e) from None


def check_utf8(file: Path) -> None:
    """Raise ValueError naming the file and the byte unless it is UTF-8 text (read in 16 MB pieces)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(file, "rb") as f:
        while piece := f.read(1 << 24):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as e:
                raise ValueError(f"{file} is not UTF-8 text (byte {offset + e.start}); save it as UTF-8") from None
            offset += len(piece)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text (it ends inside a character); save it as UTF-8") from None


def unreadable(files: Sequence[str | Path], error: BaseException) -> ValueError:
    """The error for row files that `datasets` failed to read, naming the file at fault, and for JSON the
    line, which its own messages do not."""
    for file in map(Path, files):
        if not file.is_file():
            continue
        if file.suffix in (".json", ".jsonl"):
            if not read_plain_rows(file):  # raises for the line at fault
                return ValueError(f"{file} holds no rows")
        elif file.suffix not in (".csv", ".parquet") and isinstance(error, UnicodeDecodeError):
            try:
                file.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{file} is not UTF-8 text (byte {e.start}); save it as UTF-8")
    reason = " ".join(str(error.__cause__ or error).split()) or type(error).__name__
    names = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    return ValueError(f"could not read {names}: {reason[:300]}")


def read_plain_rows(file: Path) -> list[dict[str, Any]]:
    """The rows of a JSON array, JSON-lines or CSV (with a header) file, read with the standard library.

    A file that is not UTF-8, JSON that does not parse or a row that is not an object raises ValueError
    naming the file and the line.
    """
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if file.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (truncated or "
                             "corrupt?)") from None
        if not isinstance(rows, list):
            raise ValueError(f"{file} holds a {type(rows).__name__}, not a list of rows")
        unit, numbered = "row", list(enumerate(rows))
    else:
        unit, numbered = "line", []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file} line {number} is not valid JSON: {e.msg} at column {e.colno}; each "
                                     "line of a JSON-lines file must be one JSON object") from None
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{file} {unit} {number} is a {type(row).__name__}, not an object of fields")
    return [row for _, row in numbered]


class RowError(ValueError):
    """A malformed row: its number among the rows it came from (from 0), and what is wrong with it."""

    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"row {number}: {reason}")
        self.number, self.reason = number, reason


def row_place(source: str | Path | Sequence[str | Path], number: int) -> str:
    """Where row `number` of the rows load_rows(source) gave lies, for a message: 'FILE row N'."""
    files = [str(source)] if isinstance(source, (str, Path)) else [str(file) for file in source]
    if len(files) == 1:
        return f"{files[0]} row {number}"
    offset = 0
    for file in files:  # only when reporting an error: count each file's rows to find the one at fault
        try:
            count = len(load_rows(file))
        except Exception:  # noqa: BLE001 (a file that does not load alone: say the row among all of them)
            break
        if number < offset + count:
            return f"{file} row {number - offset}"
        offset += count
    return f"row {number} of {', '.join(files)}"


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
