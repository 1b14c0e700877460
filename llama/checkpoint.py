"""Crash-safe checkpoint folders: JSON and safetensors files written all together or not at all.

A checkpoint is a folder of files that only make sense together (config, weights, tokenizer, later
optimizer state). `atomic_folder` writes them into a temporary sibling, fsyncs every file, then
renames the folder into place. A crash or SIGKILL at any moment leaves either the old folder or the
new one at the destination, never a half-written mix; at worst a hidden `.NAME.tmp-*` or
`.NAME.old-*` sibling is left over to delete.
"""
from __future__ import annotations

import dataclasses
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


# --- files inside a checkpoint ---------------------------------------------------------------------

def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


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


# --- model folders (ours) ---------------------------------------------------------------------------

CLASSIFIER_FILE = "classifier.json"  # {"labels": [...]}: the folder holds a LlamaClassifier


def write_model_files(folder: Path, config: Any, weights: dict[str, torch.Tensor] | None, tokenizer: Any,
                      labels: list[str] | None = None) -> None:
    """config.json, model.safetensors and the tokenizer: the folder load_pretrained reads as ours.

    A tied LM head is the embedding table under a second name, so it is written once. weights=None
    leaves model.safetensors out (an adapter-only checkpoint). A sequence classifier's label names go
    to classifier.json (its score.weight is in model.safetensors), so config.json stays a plain LlamaConfig.
    """
    if weights is not None:
        if config.tie_word_embeddings:
            weights = {name: t for name, t in weights.items() if name != "lm_head.weight"}
        save_tensors(weights, folder / "model.safetensors")
    config.save(folder / "config.json")
    if labels is not None:
        write_json(folder / CLASSIFIER_FILE, {"labels": labels})
    tokenizer.save(folder)


# --- training checkpoints ---------------------------------------------------------------------------
# A run folder holds step_0000100/, step_0000200/, ... (each a model folder plus train_state.json and
# train_state.safetensors: optimizer moments and RNG states), and `latest`, the name of the newest,
# written last. Optimizer state is keyed by parameter name, so it survives changes of parameter order.

LATEST = "latest"


def save_training_checkpoint(run_dir: str | Path, step: int, config: Any, weights: dict[str, torch.Tensor] | None,
                             tokenizer: Any, optimizer_state: dict[str, Any], state: dict[str, Any], *,
                             keep_last: int, adapters: dict[str, torch.Tensor] | None = None,
                             adapter_config: dict[str, Any] | None = None, labels: list[str] | None = None) -> Path:
    """Write step_N atomically, point `latest` at it, then delete all but the newest keep_last.

    LoRA runs add adapter.safetensors and adapter_config.json (rank, alpha, targets, base model);
    classification runs add classifier.json (the label names).
    """
    run_dir = Path(run_dir)
    folder = run_dir / f"step_{step:07d}"
    tensors = {f"rng.{name}": t for name, t in rng_state().items()}
    for param, moments in optimizer_state["state"].items():
        for key, value in moments.items():
            tensors[f"optimizer.{param}.{key}"] = value
    with atomic_folder(folder) as temporary:
        write_model_files(temporary, config, weights, tokenizer, labels)
        if adapters:
            save_tensors(adapters, temporary / "adapter.safetensors")
            write_json(temporary / "adapter_config.json", adapter_config or {})
        save_tensors(tensors, temporary / "train_state.safetensors")
        write_json(temporary / "train_state.json", {**state, "param_groups": optimizer_state["param_groups"]})
    _write_atomically(run_dir / LATEST, folder.name + "\n")
    steps = sorted(run_dir.glob("step_*[0-9]"))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none yet."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(run_dir) / pointer.read_text().strip()
    if not (folder / "train_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is missing or incomplete; "
                                f"point it at another step_* folder of {run_dir}")
    return folder


@dataclasses.dataclass
class TrainingCheckpoint:
    state: dict[str, Any]  # train_state.json: step, data position, run settings, ...
    weights: dict[str, torch.Tensor]  # the adapters when the run trained LoRA adapters, else the model
    optimizer: dict[str, Any]  # {"state": {param name: moments}, "param_groups": [...]}
    rng: dict[str, torch.Tensor]


def load_training_checkpoint(folder: str | Path) -> TrainingCheckpoint:
    folder = Path(folder)
    state = read_json(folder / "train_state.json")
    tensors = dict(iter_tensors(folder / "train_state.safetensors"))
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            param, _, key = name[len("optimizer."):].rpartition(".")
            moments.setdefault(param, {})[key] = tensor
    adapters = folder / "adapter.safetensors"
    weights = dict(iter_tensors(adapters if adapters.is_file() else folder / "model.safetensors"))
    rng = {name[len("rng."):]: t for name, t in tensors.items() if name.startswith("rng.")}
    return TrainingCheckpoint(state, weights, {"state": moments, "param_groups": state.pop("param_groups")}, rng)


def rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in states]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def _write_atomically(path: Path, text: str) -> None:
    """Replace a small file so that readers see the old or the new content, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)
