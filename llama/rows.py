"""Rows: the dicts that fine-tuning, classification and preference data start from.

One place reads them (local .json/.jsonl/.csv/.parquet files, a Hugging Face dataset id or folder,
or rows already in memory), picks their fields with errors that name the field, splits them into
training and validation rows, takes seeded subsets, and writes them back as JSON lines.

Files that `datasets` cannot read are said in one line that names the file and the line (JSON that does
not parse) or the field (files whose rows have other fields, or a field of two types). A hub id on a
machine that cannot reach the Hugging Face Hub is loaded from the Hugging Face cache, or refused at once
in one line, instead of after the hub client's half minute of retries.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
import random
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
        if Path(files[0]).is_dir():  # a dataset folder: its splits by file name, as the hub lays them out
            try:
                with errors_unlogged():
                    return datasets.load_dataset(files[0], split=split)
            except Exception as e:  # noqa: BLE001 (as below: errors that name no file)
                raise unreadable(row_files(Path(files[0])) or files, e) from None
        return load_hub(files[0], split)
    if None in builders or len(builders) > 1:
        raise ValueError(f"cannot load {files}: give .json/.jsonl/.csv/.parquet files of one kind, one hub id "
                         "or dataset folder, or a list of dicts")
    for file in files:
        if Path(file).is_dir():
            raise ValueError(f"{file} is a folder; pass the .json/.jsonl/.csv/.parquet files in it, or a glob")
        if Path(file).suffix != ".parquet" and Path(file).is_file():
            check_utf8(Path(file))  # datasets would fail only when the row is read, naming no file
    try:
        with errors_unlogged():
            return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except OSError:  # a missing file: datasets' message names it
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow, json and StopIteration errors that name no file)
        raise unreadable(files, e) from None


@contextlib.contextmanager
def errors_unlogged() -> Iterator[None]:
    """`datasets`' own log lines of a file it fails to read left out: the error raised instead says more, in one
    line."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def row_files(folder: Path) -> list[Path]:
    """The row files in a folder and its subfolders (not hidden ones), by name."""
    return [file for file in sorted(folder.rglob("*")) if file.is_file() and file.suffix in ROW_FILE_KINDS
            and not any(part.startswith(".") for part in file.relative_to(folder).parts)]


def load_hub(name: str, split: str, config: str | None = None) -> Any:
    """A Hugging Face dataset's split by its id (and config); where the hub cannot be reached, from the
    Hugging Face cache.

    `name` is not a local file or folder. Without a network (or with HF_HUB_OFFLINE set) a dataset that is
    not in the cache is refused at once, in one line that says what to pass instead.
    """
    import datasets

    why = hub_unreachable()
    if why is None:
        return datasets.load_dataset(name, config, split=split)
    try:
        with hub_offline():
            return datasets.load_dataset(name, config, split=split)
    except Exception:  # noqa: BLE001 (not in the cache: whichever error the offline hub client raises)
        raise ConnectionError(f"{name} is not a local file or folder, and the Hugging Face dataset {name} cannot "
                              f"be loaded: {why}, and it is not in the Hugging Face cache here; pass a local "
                              ".json/.jsonl/.csv/.parquet file or folder (python3 data/download.py NAME writes the "
                              "project's datasets into data/NAME/ where there is a network)") from None


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached now (its offline switch is set, or a connection to its host,
    or to the HTTPS proxy, fails within `timeout` seconds), or None."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    target, host = endpoint, endpoint.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
        socket.create_connection((target.hostname or host, port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return f"cannot connect to {target.hostname or host} ({reason}: no network?)"
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face libraries in their offline mode (HF_HUB_OFFLINE) for the block: the cache, no retries."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


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
    numbered: list[tuple[Path, str, list[tuple[int, dict[str, Any]]]]] = []
    for file in map(Path, files):
        if not file.is_file():
            continue
        if file.suffix in (".json", ".jsonl"):
            unit, rows = numbered_rows(file)  # raises for the line at fault
            if not rows:
                return ValueError(f"{file} holds no rows")
            numbered.append((file, unit, rows))
        elif file.suffix not in (".csv", ".parquet") and isinstance(error, UnicodeDecodeError):
            try:
                file.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{file} is not UTF-8 text (byte {e.start}); save it as UTF-8")
    if problem := mismatched_fields(numbered):
        return problem
    reason = " ".join(str(error.__cause__ or error).split()) or type(error).__name__
    names = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    return ValueError(f"could not read {names}: {reason[:300]}")


def read_plain_rows(file: Path) -> list[dict[str, Any]]:
    """The rows of a JSON array, JSON-lines or CSV (with a header) file, read with the standard library.

    A file that is not UTF-8, JSON that does not parse or a row that is not an object raises ValueError
    naming the file and the line.
    """
    return [row for _, row in numbered_rows(file)[1]]


def numbered_rows(file: Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """read_plain_rows' rows with where each is: ("line", [(line number from 1, row), ...]) for JSON lines
    and CSV, ("row", [(index in the array from 0, row), ...]) for a JSON array."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if file.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return "line", [(reader.line_num, row) for row in reader]
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
    return unit, numbered


def _kind(value: Any) -> str | None:
    """A JSON value's type, as a message says it (None for null, which any field may hold)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}[type(value)]


def mismatched_fields(numbered: Sequence[tuple[Path, str, Sequence[tuple[int, Mapping[str, Any]]]]]
                      ) -> ValueError | None:
    """What keeps JSON rows that each parse from being one table: a file whose rows have fields that the first
    file's rows do not (or lack some of theirs), or a field that holds two types; None when neither."""
    if not numbered:
        return None
    first_file, first_unit, first_rows = numbered[0]
    expected = {key for _, row in first_rows for key in row}
    for file, unit, rows in numbered[1:]:
        fields = {key for _, row in rows for key in row}
        if fields != expected:
            number, row = next(((n, r) for n, r in rows if set(r) - expected), rows[0])
            return ValueError(f"{file} {unit} {number} has the fields {_names(row)} but the rows of {first_file} "
                              f"have {_names(expected)}: the files of one dataset must have the same fields; "
                              "rename or drop fields so that they match")
    seen: dict[str, tuple[str, Path, str, int]] = {}
    for file, unit, rows in numbered:
        for number, row in rows:
            for key, value in row.items():
                kind = _kind(value)
                if kind is None:
                    continue
                if key not in seen:
                    seen[key] = (kind, file, unit, number)
                elif seen[key][0] != kind:
                    other, where, other_unit, other_number = seen[key]
                    return ValueError(f"{file} {unit} {number}: field {key!r} holds {kind}, but {where} "
                                      f"{other_unit} {other_number} holds {other} there; give the field one type "
                                      "in every row")
    return None


def _names(fields: Iterable[str]) -> str:
    return ", ".join(repr(key) for key in sorted(fields)) or "none"


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
