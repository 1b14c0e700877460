"""What the training commands share: the --eval-tasks benchmarks, and running a training job (one
error line and an exit code for whatever stops it). Their settings are dataclasses that double as flags
(llama/settings.py), the shared ones declared once (llama/trainer.py's TrainConfig).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..evaluation import (FewShot, Task, centered_accuracy, check_request, load_docs, reader, run_task,
                          task)
from .. import tasks
from ..checkpoint import latest_checkpoint
from ..files import RunLock, read_json
from ..model import Llama
from ..rows import PROJECT_DATA
from ..tokenizer import Tokenizer
from ..trainer import Distributed, SecondInterrupt, Trainer, TrainingStopped
from .usage import report


# --- benchmarks at each evaluation: --eval-tasks ------------------------------------------------



def parse_eval_tasks(spec: str) -> list[tuple[str, int | None]]:
    """(task name, limit) of each entry of --eval-tasks: TASK or TASK:LIMIT, comma-separated, the limit the
    first LIMIT items (None: the whole split); '' names none. Raises ValueError, one line naming the flag."""
    pairs: list[tuple[str, int | None]] = []
    for entry in spec.split(",") if spec.strip() else []:
        name, colon, limit = (part.strip() for part in entry.partition(":"))
        try:
            if not name:
                raise ValueError("an empty entry; give TASK or TASK:LIMIT, separated by commas")
            check_request([name], None, None)  # an unknown name: the line lists the known ones
            if colon and not (re.fullmatch("[0-9]+", limit) and int(limit) >= 1):
                raise ValueError(f"the limit of {name} must be a whole number of items, 1 or more, got {limit!r}")
            if name in (named for named, _ in pairs):
                raise ValueError(f"{name} is named twice")
        except ValueError as problem:
            raise ValueError(f"--eval-tasks {spec}: {problem}") from None
        pairs.append((name, int(limit) if colon else None))
    return pairs


def check_eval_flags(settings: Any) -> None:
    """--eval-tasks and --eval-data-dir as far as they are checked without data: valid entries, a data
    folder only with tasks, and whole models (FSDP shards them, and only the training step gathers them)."""
    tasks = parse_eval_tasks(settings.eval_tasks or "")
    if settings.eval_data_dir is not None and not tasks:
        raise ValueError("--eval-data-dir is for --eval-tasks; name the tasks to score")
    if tasks and settings.fsdp:
        raise ValueError("--eval-tasks needs the whole model in each process; --fsdp shards it, so leave one out")


class Benchmarks:
    """The --eval-tasks benchmarks, scored with llama.evaluation.run_task on the model being trained at each
    of its evaluations (the Trainer calls it under no_grad, in eval mode and the validation's autocast).

    Made before training: each task's documents are read here, once, so that missing or unreadable data
    stops the run before it writes anything, not at its first evaluation; the run's evaluations read them
    from that cache (each task's `read`), not from the disk. for_model() then checks that the model's
    context fits the tasks and keeps its tokenizer. Every process of a distributed run scores the same
    documents with the same weights, which takes no longer than rank 0 alone and keeps every process
    busy instead of waiting at a collective for as long as the evaluation takes; rank 0 logs them.
    """

    def __init__(self, spec: str, data_dir: str | Path) -> None:
        self.data_dir, self.tokenizer = Path(data_dir), None
        self.tasks: list[tuple[Task, int | None]] = []
        for name, limit in parse_eval_tasks(spec):
            cached = _reading_once(task(name))
            try:
                docs, fewshot = load_docs(cached, self.data_dir)
                FewShot(cached, docs, fewshot, cached.num_fewshot)  # the split holds enough examples for its shots
            except FileNotFoundError as error:
                if error.filename is not None:  # a file of the task's folder, which the line names
                    raise
                folder = self.data_dir / cached.folder
                raise FileNotFoundError(f"--eval-tasks {name}: no {name} data in {folder}: python3 data/download.py "
                                        f"{cached.folder} (or --eval-data-dir DIR, a folder holding "
                                        f"{cached.folder}/)") from None
            except ValueError as error:
                raise ValueError(f"--eval-tasks {name}: {error}") from None
            self.tasks.append((cached, limit))

    def for_model(self, tokenizer: Tokenizer, context: int) -> Benchmarks:
        """These benchmarks for a model of `context` positions that reads `tokenizer`'s ids; a task that
        generates more tokens than the context holds is refused."""
        for t, _ in self.tasks:
            if t.kind == "generate" and t.max_gen_tokens >= context:
                raise ValueError(f"--eval-tasks {t.name}: {t.name} generates up to {t.max_gen_tokens} tokens, which "
                                 f"leaves no room for its prompt in the model's {context}-token context")
        self.tokenizer = tokenizer
        return self

    def __call__(self, model: Llama) -> dict[str, float]:
        """{eval/TASK/METRIC: value} of every task (with METRIC_stderr, and TASK/truncated: the items whose
        input lost its left end to fit the context), and eval/centered_accuracy when a multiple-choice
        task ran."""
        results = {t.name: run_task(model, self.tokenizer, t, self.data_dir, limit=limit, progress=False)
                   for t, limit in self.tasks}
        numbers: dict[str, float] = {}
        for name, result in results.items():
            for key, value in result.items():
                if key in ("items", "num_fewshot") or (key.endswith("_stderr") and not math.isfinite(value)):
                    continue  # what the flags say, and the spread of a single item (NaN, which JSON lacks)
                numbers[f"eval/{name}/{key}"] = value
        centered = centered_accuracy(results)
        if centered is not None:
            numbers["eval/centered_accuracy"] = centered
        return numbers

    def summary(self, numbers: dict[str, Any]) -> str:
        """The numbers as the console shows them: 'piqa acc 0.5000, acc_norm 0.6250; ...'."""
        parts = []
        for t, _ in self.tasks:
            prefix = f"eval/{t.name}/"
            scores = ", ".join(f"{key.removeprefix(prefix)} {value:.4f}" for key, value in numbers.items()
                               if key.startswith(prefix) and not key.endswith(("_stderr", "/truncated")))
            cut = numbers.get(prefix + "truncated", 0)
            parts.append(f"{t.name} {scores}" + (f" ({cut} items cut to fit the context)" if cut else ""))
        if "eval/centered_accuracy" in numbers:
            parts.append(f"centered accuracy {numbers['eval/centered_accuracy']:.4f}")
        return "; ".join(parts)


def _reading_once(t: Task) -> Task:
    """The task, its splits' documents read from the disk once and then kept."""
    read = reader(t)
    kept: dict[tuple[Path, str], list[dict]] = {}

    def read_once(folder: Path, split: str) -> list[dict]:
        key = (Path(folder), split)
        if key not in kept:
            kept[key] = read(folder, split)
        return kept[key]

    return dataclasses.replace(t, read=read_once)


def benchmarks(settings: Any) -> Benchmarks | None:
    """The Benchmarks of settings.eval_tasks (their data read from settings.eval_data_dir, by default the
    repository's data/), None when it names none."""
    if not parse_eval_tasks(settings.eval_tasks or ""):
        return None
    return Benchmarks(settings.eval_tasks, settings.eval_data_dir or PROJECT_DATA)


# --- running a training job ---------------------------------------------------------------------

def fit(build: Callable[[Distributed], tuple[Trainer, str]], resume: bool, out: str | Path) -> Path:
    """Build a Trainer with build(dist_info), resume it if asked, train; returns the run folder.

    The run folder `out` is locked first (llama/files.py's RunLock, by the main process), so that a second
    run on it is refused before it reads or writes anything, and a run that fails leaves no folder it made.
    Raises ValueError, FileNotFoundError or OSError for bad input and TrainingStopped when training
    cannot go on; `exit_code` turns those into one line and an exit code.
    """
    dist_info = Distributed.from_env()
    trainer = None
    lock = RunLock(out) if dist_info.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        trainer, banner = build(dist_info)
        if resume and not trainer.resume() and dist_info.is_main:
            print(f"no checkpoint in {trainer.out_dir} yet: starting a new run", file=sys.stderr)
        if dist_info.is_main:
            print(banner, file=sys.stderr)
        trainer.fit()
        return trainer.out_dir
    finally:
        if lock is not None:
            lock.release()
        if dist_info.world_size > 1:
            # DDP's reducer holds the process group too. Freed after destroy_process_group, it would run
            # the group's destructor while holding the GIL, which joins gloo's worker threads while one
            # may wait for the GIL to free a tensor: a deadlock that hung about one run in five.
            del trainer
            gc.collect()
            dist.destroy_process_group()


def check_resumed_command(out: Path, command: str) -> None:
    """Refuse to --resume a run that another command line trained (a DPO run without --task dpo, a
    pretraining run with finetune.py), naming the command that resumes it: its newest checkpoint records
    its task (task.json, llama/tasks), and a pretraining run records none. `command`: this one, as
    "train.py" or "finetune.py --task NAME"."""
    kept = latest_checkpoint(out)
    if kept is None:
        return
    trained = tasks.recorded(kept)
    if trained is not None:
        made_by = f"finetune.py --task {trained.name}"
    elif "task" in read_json(kept / "train_state.json").get("run_identity", {}):
        return  # a fine-tuning run of a task this library no longer has: --resume's own checks say more
    else:
        made_by = "train.py"
    if made_by != command:
        raise ValueError(f"{out} is a run of {made_by}; resume it with {made_by} --resume, not {command}")


def exit_code(job: Callable[[], object]) -> int:
    """Run job(): 0 when it returns; 1 when training stopped (a NaN loss, say); 2 for bad input, a
    missing or unwritable file and a full disk (fix it, then run again: --resume continues); 130 when a
    second Ctrl-C stops at once. The reason is printed as one line."""
    try:
        job()
        return 0
    except TrainingStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        return 1
    except (ValueError, OSError) as error:  # OSError: FileNotFoundError, PermissionError, a full disk, ...
        return report(error)
    except SecondInterrupt as stop:
        print(f"\nstopped at once by a second interrupt, without saving; {stop or 'the last checkpoint is intact'}",
              file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before training began (loading the model or the data)
        print("\ninterrupted before training started", file=sys.stderr, flush=True)
        return 130
