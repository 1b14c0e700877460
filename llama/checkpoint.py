"""Checkpoint folders: our model folder, the training checkpoints of a run, and the training state they hold.

A model folder (ours) is config.json (a LlamaConfig), model.safetensors and the tokenizer files;
a fine-tuning task adds task.json (which task) and its own files (llama/tasks/), a LoRA run adapter.safetensors and
adapter_config.json. A run folder holds step_0000100/, step_0000200/, ..., each a model folder plus
train_state.json and train_state.safetensors (optimizer moments, RNG states, the data position and
the run's identity), and `latest`, the name of the newest, written last. Every folder is written
atomically (llama/files.py). While a run writes its folder, `.llama.lock` there holds its PID (RunLock), so a
second run on it is refused.

The optimizer state is stored by parameter name, not by position, so it survives changes of
parameter order, and the same files serve plain, LoRA and FSDP runs: `training_state` captures what
to save from a model and optimizer, `restore_training_state` puts it back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import lora
from .files import (atomic_folder, clean_orphans, discard_folder, iter_tensors, read_json, save_tensors, tensor_bytes,
                    write_json, write_text_atomically)

ADAPTER_CONFIG = "adapter_config.json"
LATEST = "latest"
# Every file of a model folder that save_pretrained writes, in either format (and a task's: llama/tasks/).
MODEL_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "generation_config.json", "task.json"})


# --- model folders ----------------------------------------------------------------------------------

def write_model_files(folder: Path, config: Any, weights: dict[str, torch.Tensor] | None, tokenizer: Any,
                      files: dict[str, Any] | None = None) -> None:
    """config.json, model.safetensors and the tokenizer: the folder load_pretrained reads as ours.

    A tied LM head is the embedding table under a second name, so it is written once. weights=None
    leaves model.safetensors out (an adapter-only checkpoint). `files` are JSON files by name: what a
    fine-tuning task records about its head (llama/tasks/), so config.json stays a plain LlamaConfig.
    """
    if weights is not None:
        if config.tie_word_embeddings:
            weights = {name: t for name, t in weights.items() if name != "lm_head.weight"}
        save_tensors(weights, folder / "model.safetensors")
    config.save(folder / "config.json")
    for name, content in (files or {}).items():
        write_json(folder / name, content)
    tokenizer.save(folder)


def is_model_folder(folder: Path, task_files: frozenset[str] = frozenset()) -> bool:
    """True when `folder` holds a config.json and nothing but files that save_pretrained writes (with
    task_files, the tasks' own: llama.tasks.file_names())."""
    entries = list(folder.iterdir())
    return (folder / "config.json").is_file() and all(entry.is_file() and entry.name in MODEL_FILES | task_files
                                                      for entry in entries)


# --- training state: what a checkpoint holds besides the model --------------------------------------

def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                   fsdp: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights to save, optimizer state by parameter name) of a model being trained.

    The weights are those of the equivalent plain model: LoRA updates are merged in, FSDP shards
    gathered (on every rank, which must all call this together).
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options))
    order, _ = _parameter_order(model, optimizer)
    state = optimizer.state_dict()
    by_name = {"state": {order[i]: moments for i, moments in state["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    return lora.merged_state_dict(model), by_name


def restore_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                           optimizer_state: dict[str, Any], *, fsdp: bool = False) -> None:
    """Load what `training_state` captured back into the model and its optimizer.

    A LoRA model takes only its adapters from `weights` (its base came from --model); a tied LM head
    is filled from the embedding table, which the checkpoint stores once.
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return
    if lora.lora_modules(model):
        missing = set(lora.adapter_state_dict(model)) - set(weights)
        if missing:
            raise ValueError(f"the checkpoint lacks adapter weights {sorted(missing)[:4]}; resume with the "
                             "same --lora-rank")
        model.load_state_dict(weights, strict=False)
    else:
        if model.config.tie_word_embeddings:
            weights = {**weights, "lm_head.weight": weights["embed_tokens.weight"]}
        model.load_state_dict(weights)
    _, index = _parameter_order(model, optimizer)
    optimizer.load_state_dict({
        "state": {index[name]: moments for name, moments in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in optimizer_state["param_groups"]]})


def _parameter_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], dict[str, int]]:
    """Names of the optimizer's parameters in its own index order, and the reverse map."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return order, {name: i for i, name in enumerate(order)}


# --- training checkpoints ---------------------------------------------------------------------------

def save_training_checkpoint(run_dir: str | Path, step: int, config: Any, weights: dict[str, torch.Tensor] | None,
                             tokenizer: Any, optimizer_state: dict[str, Any], state: dict[str, Any], *,
                             keep_last: int, adapters: dict[str, torch.Tensor] | None = None,
                             adapter_config: dict[str, Any] | None = None, files: dict[str, Any] | None = None) -> Path:
    """Write step_N atomically, point `latest` at it, then delete all but the newest keep_last.

    LoRA runs add adapter.safetensors and adapter_config.json (rank, alpha, targets, base model);
    `files` are the task's JSON files (task.json and, for a classifier, classifier.json).
    """
    run_dir = Path(run_dir)
    folder = run_dir / f"step_{step:07d}"
    tensors = {f"rng.{name}": t for name, t in rng_state().items()}
    for param, moments in optimizer_state["state"].items():
        for key, value in moments.items():
            tensors[f"optimizer.{param}.{key}"] = value
    tokenizer_bytes = len(tokenizer.backend.to_str())  # the rest (configs, train_state.json) is small
    needed = tensor_bytes([*(weights or {}).values(), *tensors.values(), *(adapters or {}).values()]) + tokenizer_bytes
    with atomic_folder(folder, needed_bytes=needed) as temporary:
        write_model_files(temporary, config, weights, tokenizer, files)
        if adapters:
            save_tensors(adapters, temporary / "adapter.safetensors")
            write_json(temporary / ADAPTER_CONFIG, adapter_config or {})
        save_tensors(tensors, temporary / "train_state.safetensors")
        write_json(temporary / "train_state.json", {**state, "param_groups": optimizer_state["param_groups"]})
    write_text_atomically(run_dir / LATEST, folder.name + "\n")
    steps = sorted(path for path in run_dir.glob("step_*[0-9]") if path.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != folder:
            try:
                discard_folder(old)
            except OSError as error:  # the new checkpoint is saved: an old one left in place is no reason to stop
                print(f"warning: could not delete the old checkpoint {old} ({error.strerror}); it is left in place",
                      file=sys.stderr, flush=True)
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none yet.

    That is the step_* folder `latest` names; without `latest` (a kill after the first checkpoint was
    written, before its pointer was) the newest step_* folder that holds its train_state.json.
    """
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        complete = [folder for folder in sorted(Path(run_dir).glob("step_*[0-9]"))
                    if (folder / "train_state.json").is_file()]
        return complete[-1] if complete else None
    folder = Path(run_dir) / pointer.read_text().strip()
    if not (folder / "train_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is missing or incomplete; "
                                f"point it at another step_* folder of {run_dir}")
    return folder


def check_same_run(folder: Path, saved: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to resume the checkpoint `folder`, whose run identity is `saved`, with other run settings
    (`identity`). A setting only one of them knows (added since the checkpoint was made, or one its task no
    longer has) is no change."""
    identity = json.loads(json.dumps(identity))  # as a checkpoint holds it: tuples become lists
    changed = sorted(k for k in set(saved) & set(identity) if saved[k] != identity[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {folder}: it was made with other settings ({details}); "
                         "use the same settings, or a new --out")


def check_resumable(run_dir: str | Path, identity: dict[str, Any]) -> None:
    """check_same_run on the run's newest checkpoint, read from its train_state.json alone: the commands
    call it before they read data or compute anything for the run (nothing when the run has none yet)."""
    folder = latest_checkpoint(run_dir)
    if folder is not None:
        saved = read_json(folder / "train_state.json").get("run_identity")
        check_same_run(folder, saved if isinstance(saved, dict) else {}, identity)


@dataclasses.dataclass
class TrainingCheckpoint:
    state: dict[str, Any]  # train_state.json: step, data position, run identity, ...
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


# What a run folder holds besides its step_* checkpoints and `latest`: a run stopped before its first
# checkpoint holds only these, and --resume starts it anew there. (reference_logps.json: a DPO run's
# reference log-probabilities, llama/tasks/dpo.py, written before its first step.)
RUN_FILES = frozenset({"metrics.jsonl", "loss.png", "reference_logps.json"})
_STEP = re.compile(r"step_\d+")


def check_run_folder(out: Path, resume: bool, *, main_process: bool = True) -> None:
    """Refuse to write into a folder that is not this run's, and fail now, not at the first checkpoint,
    if `out` cannot be written. Tidies what a killed save left in it.

    A new run needs a new or empty folder: an old run's checkpoints and metrics are never overwritten or
    mixed with a new run's, whether or not it has a `latest` pointer, and no one else's files are touched.
    --resume needs a run folder: one with `latest`, or one with nothing but RUN_FILES and step_* folders
    (killed before its first `latest` was written; with no complete step_* the run starts anew). Every
    step_* in it must be a checkpoint (a folder with train_state.json, which each save writes whole): a
    save would replace one of that name, and pruning delete it. Hidden names (.llama.lock, a killed save's
    .step_*.tmp-*) are not the run's files. The folder is not created here (RunLock does, for the run).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write the run folder {out}: it is a file; choose a folder for --out")
    entries = sorted(entry.name for entry in out.iterdir() if not entry.name.startswith(".")) if out.is_dir() else []
    if entries and not resume:
        what = "a run" if LATEST in entries or RUN_FILES & set(entries) else "files"
        raise ValueError(f"{out} already holds {what} ({_listed(entries)}); pass --resume to continue a run, or "
                         "choose a new or empty --out")
    foreign = [name for name in entries if name not in RUN_FILES and not _STEP.fullmatch(name)]
    if entries and resume and LATEST not in entries and foreign:
        raise ValueError(f"{out} is not a run folder that --resume can continue: it has no {LATEST} pointer and "
                         f"holds {_listed(foreign)}; choose the run's folder, or a new or empty --out")
    not_checkpoints = [name for name in entries if _STEP.fullmatch(name)
                       and not (out / name / "train_state.json").is_file()]
    if not_checkpoints:
        what, it = ("is not a checkpoint", "it") if len(not_checkpoints) == 1 else ("are not checkpoints", "them")
        raise ValueError(f"{out} holds {_listed(not_checkpoints)}, which {what} of a run (no train_state.json), and a "
                         f"save would replace {it}; move {it} out of the folder, or choose another --out")
    if not main_process or not out.is_dir():
        return
    try:
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write the run folder {out}: {e.strerror}; choose a writable --out") from None
    clean_orphans(out)


def _listed(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
