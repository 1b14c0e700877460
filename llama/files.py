"""Crash-safe files: folders and small files written all at once or not at all, JSON and safetensors I/O
whose errors name the file.

A checkpoint is a folder of files that only make sense together (config, weights, tokenizer,
optimizer state). `atomic_folder` writes them into a temporary sibling, fsyncs every file, then
renames the folder into place. A crash or SIGKILL at any moment leaves either the old folder or the
new one at the destination, never a half-written mix; at worst a hidden `.NAME.tmp-*` or
`.NAME.old-*` sibling is left over, which `clean_orphans` tidies at the next start.
`atomic_file` does the same for one file (a GGUF model), `write_text_atomically` for one small one (a
`latest` pointer, a meta.json, a results page), and `discard_folder` deletes a folder all at once
(renamed aside first, so a crash never leaves half of it under its name).

A full disk is said in one line that names the folder, the space the write needed and the space free
(`disk_full`), and leaves nothing half-written behind: the temporary folder is removed, the previous
version stays in place. `read_jsonl` reads an append-only log (metrics.jsonl) whose last line a crash or
a full disk may have torn.

`RunLock` keeps a second process out of a folder a run is writing (a lock file holding the first one's PID),
`check_output_path` refuses an output path the libraries cannot write (not UTF-8) before any work, and
`not_a_file` names why a path cannot be read (missing, a broken link, a loop of links, a folder, a device).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_folder(destination: str | Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder to write into; on success it replaces `destination` whole.

    If the block raises, the temporary folder is deleted and `destination` is left untouched; a full
    disk becomes `disk_full`'s error, with `needed_bytes` (an estimate of what the folder holds) in it.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"{destination} exists and is not a folder; pass a folder path to save into")
    temporary = _sibling(destination, "tmp")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
    except OSError as e:  # a read-only or full destination: named, not its temporary sibling
        if is_disk_full(e):
            raise disk_full(destination.parent, needed_bytes, f"{destination.name}/") from None
        raise type(e)(e.errno, e.strerror, str(destination)) from None
    try:
        yield temporary
        _fsync_tree(temporary)
        _replace_folder(temporary, destination)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full(destination.parent, needed_bytes, f"{destination.name}/") from None
        raise


def discard_folder(folder: Path) -> None:
    """Delete `folder` all at once: renamed to a hidden sibling first, then removed."""
    aside = _sibling(folder, "del")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


_ORPHAN = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-[0-9a-f]{8}")


def clean_orphans(folder: str | Path) -> list[str]:
    """Tidy what writers killed in `folder` left behind (not in its subfolders); returns the names tidied.

    A temporary `.NAME.tmp-PID-HEX` sibling of a dead process is deleted, and so is a `.NAME.del-*` one
    (a folder being discarded). An `.NAME.old-PID-HEX` one (the previous version of a folder being
    replaced) is deleted when NAME exists, and renamed back to NAME when it does not: the kill came
    between the two renames of the replacement. Those of a process still running are left alone.
    """
    folder = Path(folder)
    tidied = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _ORPHAN.fullmatch(entry.name)
        if match is None or _running(int(match["pid"])):
            continue
        original = folder / match["name"]
        if match["kind"] == "old" and not original.exists():
            os.rename(entry, original)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        tidied.append(entry.name)
    return tidied


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes nothing yet when it tidies
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# --- a full disk -----------------------------------------------------------------------------------

def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(folder: Path, needed_bytes: int | None, what: str) -> OSError:
    """The one-line error of a write that ran out of space: the folder, what it wrote, space needed and free."""
    folder = Path(folder)
    place = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(place).free
    needed = f"about {_size(needed_bytes)}" if needed_bytes else "more"
    return OSError(errno.ENOSPC, f"no space left in {folder} to write {what}: it needs {needed} and {_size(free)} "
                                 "are free; free some space there")


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def write_text_atomically(path: str | Path, text: str | bytes) -> None:
    """Replace a small file (text, or bytes) so that readers see the old or the new content, never a mix.

    Its errors name `path`, not the temporary file beside it.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    with atomic_file(path, len(data)) as temporary, open(temporary, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: str | Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write one file into; once the block succeeds, the file is
    fsynced and renamed to `path`, replacing what was there in one step.

    If the block raises, the temporary file is removed and `path` is untouched. Errors name `path`, not
    the temporary file; a full disk becomes `disk_full`'s error, with `needed_bytes` in it.
    """
    path = Path(path)
    temporary = _sibling(path, "tmp")
    try:
        yield temporary
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # on a read-only folder even this fails
            temporary.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(path.parent, needed_bytes, path.name) from None
        if isinstance(error, OSError) and error.errno is not None:
            raise type(error)(error.errno, error.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log, whole or not at all: a failed write (a full disk) is cut back off.

    Only a kill in the middle of the write can leave a torn last line, which read_jsonl leaves out.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            remaining = data
            while remaining:
                remaining = remaining[os.write(fd, remaining):]
        except OSError as error:
            os.ftruncate(fd, start)
            if is_disk_full(error):
                raise disk_full(path.parent, len(data), f"a line of {path.name}") from None
            raise
    finally:
        os.close(fd)


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


# --- paths ---------------------------------------------------------------------------------------------

def printable(path: str | Path) -> str:
    """A path as an error line shows it: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_output_path(path: str | Path, flag: str) -> None:
    """Refuse an output path that is not valid UTF-8 (bytes a terminal or a file system let through), now:
    the tokenizer and safetensors writers take only UTF-8 names and would fail at the first save."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{flag} {printable(path)} is not valid UTF-8; choose a name spelt in UTF-8") from None


def not_a_file(path: str | Path, hint: str = "") -> OSError:
    """Why `path` cannot be read as a file, as the error to raise, naming its real cause: missing, a link to
    nothing, a loop of links, a folder on its way that cannot be entered, a folder, a device or FIFO. `hint`
    (what to pass instead) ends the line after a semicolon."""
    path = Path(path)
    end = f"; {hint}" if hint else ""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            return FileNotFoundError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist{end}")
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return FileNotFoundError(f"{path} does not exist{end}")
        if e.errno == errno.ELOOP:
            return OSError(f"{path} is a loop of symbolic links, which leads to no file{end}")
        return OSError(f"{path} cannot be read: {(e.strerror or str(e)).lower()}{end}")
    if stat.S_ISDIR(mode):
        return IsADirectoryError(f"{path} is a folder, not a file{end}")
    if not stat.S_ISREG(mode):
        return OSError(f"{path} is not a regular file (a device, FIFO or socket){end}")
    return OSError(f"{path} cannot be read{end}")


# --- a run folder's lock ------------------------------------------------------------------------------

LOCK_FILE = ".llama.lock"  # in a run folder while a run writes it: the PID of that run


class RunLock:
    """One process at a time in a run folder: an flock on `FOLDER/.llama.lock`, which holds its holder's PID.

    acquire() creates the folder when it is missing (and release() removes it again when it is left empty,
    so that a run that failed leaves nothing behind); a second process is refused with one line naming the
    first. The kernel lets go of the lock when its process ends, however it ends: the lock of a killed run
    is taken over by the next one. `flag` names the folder in error lines (--out).
    """

    def __init__(self, folder: str | Path, flag: str = "--out") -> None:
        self.folder, self.flag = Path(folder), flag
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders acquire() created, deepest first

    def acquire(self) -> RunLock:
        missing = [p for p in (self.folder, *self.folder.parents) if not os.path.lexists(p)]
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            if self.folder.exists():
                raise ValueError(f"cannot write the run folder {self.folder}: it is a file; choose a folder for "
                                 f"{self.flag}")
            raise ValueError(f"cannot write the run folder {self.folder}: {not_a_file(self.folder)}; choose another "
                             f"{self.flag}")  # a link to nothing, a loop of links
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write the run folder {self.folder}: {e.strerror or e}; choose "
                             f"a writable {self.flag}") from None
        self._made = missing
        path = self.folder / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                self._remove_made()
                raise ValueError(f"cannot write the run folder {self.folder}: {e.strerror or e}; "
                                 f"choose a writable {self.flag}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                self._remove_made()
                raise ValueError(f"{self.folder} is in use by another run ({who}, which holds {path}); wait for it "
                                 f"to end or stop it, or choose another {self.flag}") from None
            try:  # the holder before us may have removed the file as we opened it: lock the one in place
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        held = os.read(fd, 64)
        if not re.fullmatch(rb"\d*\n?", held):  # not a PID that a run wrote: someone else's file of that name
            os.close(fd)
            self._remove_made()
            raise ValueError(f"{path} is not the lock of a run (it holds no process id), so it is left as it is; move "
                             f"it out of {self.folder}, or choose another {self.flag}")
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go: the lock file is removed (a folder this lock created, and left empty, too)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.folder / LOCK_FILE)
        os.close(self._fd)
        self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # deepest first; a folder that holds something now stays
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- JSON ------------------------------------------------------------------------------------------

def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`, with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a JSON file")
    if not path.is_file():
        raise not_a_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """(the JSON objects of a JSON-lines log, whether its last line was torn and left out).

    An append cut short by a crash or a full disk leaves a last line that does not parse: it is left
    out. Any other line that is not a JSON object is an error naming the file and the line.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if all(not rest.strip() for rest in lines[number:]):  # the last line: an append cut short
                torn = True
                break
            raise ValueError(f"{path} line {number} is not valid JSON ({e}); delete or mend that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} holds a {type(record).__name__}, not a JSON object")
        records.append(record)
    return records, torn


# --- safetensors -----------------------------------------------------------------------------------

def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file from CPU copies of the tensors, made contiguous as the format requires.

    The writer's I/O failures (a full disk, a read-only folder) are raised as the OSError they are.
    """
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path),
                  metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header alone."""
    with _open_safetensors(path) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def iter_tensors(path: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from a safetensors file, one at a time: all of them, or the given names."""
    with _open_safetensors(path) as f:
        for name in f.keys() if names is None else names:
            yield name, f.get_tensor(name)


@contextlib.contextmanager
def _open_safetensors(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt: {e})") from None
    with handle as f:
        yield f
