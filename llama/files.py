"""Crash-safe files: folders and small files written all at once or not at all, JSON and safetensors I/O
whose errors name the file.

A checkpoint is a folder of files that only make sense together (config, weights, tokenizer,
optimizer state). `atomic_folder` writes them into a temporary sibling, fsyncs every file, then
renames the folder into place. A crash or SIGKILL at any moment leaves either the old folder or the
new one at the destination, never a half-written mix; at worst a hidden `.NAME.tmp-*` or
`.NAME.old-*` sibling is left over. `write_text_atomically` does the same for one small file (a
`latest` pointer, a meta.json, a results page).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@contextmanager
def atomic_folder(destination: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder to write into; on success it replaces `destination` whole.

    If the block raises, the temporary folder is deleted and `destination` is left untouched.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"{destination} exists and is not a folder; pass a folder path to save into")
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(destination, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        _fsync_tree(temporary)
        _replace_folder(temporary, destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace a small file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    temporary = _sibling(path, "tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _replace_folder(new: Path, destination: Path) -> None:
    """Rename `new` to `destination`. An existing destination is renamed aside first, deleted last."""
    if not destination.exists():
        os.rename(new, destination)
        _fsync_dir(destination.parent)
        return
    aside = _sibling(destination, "old")
    os.rename(destination, aside)
    try:
        os.rename(new, destination)
    except BaseException:
        os.rename(aside, destination)
        raise
    _fsync_dir(destination.parent)
    shutil.rmtree(aside, ignore_errors=True)  # the new folder is in place; a leftover is only clutter


def _sibling(destination: Path, kind: str) -> Path:
    """A hidden, unused name next to `destination`, unique to this process and call."""
    return destination.parent / f".{destination.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- JSON ------------------------------------------------------------------------------------------

def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# --- safetensors -----------------------------------------------------------------------------------

def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file from CPU copies of the tensors, made contiguous as the format requires."""
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path),
              metadata={"format": "pt"})


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header alone."""
    with _open_safetensors(path) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def iter_tensors(path: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from a safetensors file, one at a time: all of them, or the given names."""
    with _open_safetensors(path) as f:
        for name in f.keys() if names is None else names:
            yield name, f.get_tensor(name)


@contextmanager
def _open_safetensors(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt: {e})") from None
    with handle as f:
        yield f
