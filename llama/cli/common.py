"""What the command lines share: settings dataclasses that double as their flags, and running a training job.

A training command's settings are a dataclass whose fields are declared with `option(...)`: the field
is the typed argument a caller (an experiment, a test) passes, and the flag --FIELD-NAME with its help
text is what argparse shows. So the defaults live in one place, and `run(Settings(...))` and
`main(["--flag", ...])` train the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..evaluation import (TASKS, FewShot, Task, centered_accuracy, check_request, load_docs, reader, run_task,
                          task)
from ..model import Llama
from ..rows import PROJECT_DATA
from ..tokenizer import Tokenizer
from ..trainer import Distributed, SecondInterrupt, Trainer, TrainingStopped
from .usage import report


def option(default: Any, help: str, check: Callable[[Any], str | None] | None = None, **argparse_options: Any) -> Any:
    """A settings field that is also the flag --NAME (underscores become dashes).

    argparse_options are add_argument's keywords (choices, required, metavar, ...) plus group= (the
    --help heading it is listed under) and exclusive= (flags sharing an exclusive= name exclude each
    other). The flag's type and nargs come from the field's annotation. check(value) says what is wrong
    with a value (None when nothing is): `check_settings` applies it, and the type and choices, to
    whatever filled the field, flags or a caller.
    """
    metadata = {"help": help, **argparse_options, **({"check": check} if check else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_flags(parser: argparse.ArgumentParser, settings: type) -> None:
    """One flag per option() field of the `settings` dataclass, in field order, under their groups."""
    hints = typing.get_type_hints(settings)
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata:
            continue
        options = dict(field.metadata)
        group, together = options.pop("group", None), options.pop("exclusive", None)
        options.pop("check", None)
        target = parser
        if group is not None:
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            target = groups[group]
        if together is not None:
            if together not in exclusive:
                exclusive[together] = target.add_mutually_exclusive_group()
            target = exclusive[together]
        kind = hints[field.name]
        if kind is bool:
            options.setdefault("action", "store_true")
        else:
            scalar, nargs = _flag_type(kind)
            options.setdefault("type", scalar)
            if nargs is not None:
                options.setdefault("nargs", nargs)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        target.add_argument("--" + field.name.replace("_", "-"), default=default, **options)


def _flag_type(kind: Any) -> tuple[type, int | str | None]:
    """(the type of one value, nargs) of an annotation: X, X | None, list[X] or tuple[X, ...]."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    origin = typing.get_origin(kind)
    if origin is list:
        return typing.get_args(kind)[0], "+"
    if origin is tuple:
        return typing.get_args(kind)[0], len(typing.get_args(kind))
    return kind, None


# --- what a setting may be ----------------------------------------------------------------------

def at_least(low: float) -> Callable[[Any], str | None]:
    """A check: the number is finite and at least `low`."""
    return lambda value: None if math.isfinite(value) and value >= low else f"must be at least {low:g}"


def above(low: float) -> Callable[[Any], str | None]:
    """A check: the number is finite and above `low`."""
    return lambda value: None if math.isfinite(value) and value > low else f"must be above {low:g}"


def fraction(value: float) -> str | None:
    """A check: a share in [0, 1)."""
    return None if 0 <= value < 1 else "must be in [0, 1)"


def check_settings(settings: Any) -> None:
    """Raise ValueError, naming the flag, for the first field of a settings dataclass whose value has the
    wrong type, is not among its choices or fails its check. Path-like values of str fields become str."""
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata:
            continue
        value = getattr(settings, field.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            setattr(settings, field.name, value)
        problem = setting_problem(type(settings), field.name, value)
        if problem:
            raise ValueError(f"--{field.name.replace('_', '-')} {problem}, got {value!r}")


def setting_problem(settings: type, name: str, value: Any) -> str | None:
    """What is wrong with `value` for the field `name` of the `settings` dataclass, or None."""
    field = next(f for f in dataclasses.fields(settings) if f.name == name)
    kind = typing.get_type_hints(settings)[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None:
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        element = typing.get_args(kind)[0]
        length = len(typing.get_args(kind)) if origin is tuple and ... not in typing.get_args(kind) else None
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            return f"must be a list of {length or 'one or more'} {_TYPE_NAMES[element]} values"
        values = list(value)
    else:
        element, values = kind, [value]
    for item in values:
        if not _is_a(item, element):
            return f"must be {_TYPE_NAMES[element]}"
        if "choices" in field.metadata and item not in field.metadata["choices"]:
            return f"must be one of {', '.join(map(str, field.metadata['choices']))}"
        if "check" in field.metadata and (problem := field.metadata["check"](item)):
            return problem
    return None


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def settings_from(settings: type, namespace: argparse.Namespace) -> Any:
    """The `settings` dataclass filled from parsed flags."""
    return settings(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(settings)
                       if "help" in field.metadata})


def run_identity(settings: Any, defines_run: Iterable[str], **derived: Any) -> dict[str, Any]:
    """What --resume compares: the settings named in defines_run, plus values derived from them."""
    return {**{name: getattr(settings, name) for name in defines_run}, **derived}


def check_classified(settings: type, defines_run: Iterable[str], may_change: Iterable[str]) -> None:
    """Every flag of `settings` is either part of a run's identity or allowed to change on --resume."""
    flags = {field.name for field in dataclasses.fields(settings) if "help" in field.metadata}
    defines_run, may_change = set(defines_run), set(may_change)
    problems = {"in both lists": defines_run & may_change, "in neither list": flags - defines_run - may_change,
                "not flags": (defines_run | may_change) - flags}
    problems = {what: sorted(names) for what, names in problems.items() if names}
    if problems:
        raise AssertionError(f"{settings.__name__}: DEFINES_RUN and MAY_CHANGE are out of date: {problems}")


# --- benchmarks at each evaluation: --eval-tasks ------------------------------------------------

EVALUATION = "benchmarks at each evaluation"
EVAL_TASKS_HELP = ("score these benchmarks at each evaluation (the validation's cadence, and the end) and log "
                   "eval/TASK/METRIC: a comma list of TASK or TASK:LIMIT (its first LIMIT items; no limit: the "
                   f"whole split), e.g. piqa:500,hellaswag:200. Tasks: {', '.join(TASKS)} (default: none)")
EVAL_DATA_DIR_HELP = ("folder holding the tasks' data as `python3 data/download.py TASK` writes it, one TASK/ "
                      "folder each (default: the repository's data/)")


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

def fit(build: Callable[[Distributed], tuple[Trainer, str]], resume: bool) -> Path:
    """Build a Trainer with build(dist_info), resume it if asked, train; returns the run folder.

    Raises ValueError, FileNotFoundError or OSError for bad input and TrainingStopped when training
    cannot go on; `exit_code` turns those into one line and an exit code.
    """
    dist_info = Distributed.from_env()
    trainer = None
    try:
        trainer, banner = build(dist_info)
        if resume and not trainer.resume() and dist_info.is_main:
            print(f"no checkpoint in {trainer.out_dir} yet: starting a new run", file=sys.stderr)
        if dist_info.is_main:
            print(banner, file=sys.stderr)
        trainer.fit()
        return trainer.out_dir
    finally:
        if dist_info.world_size > 1:
            # DDP's reducer holds the process group too. Freed after destroy_process_group, it would run
            # the group's destructor while holding the GIL, which joins gloo's worker threads while one
            # may wait for the GIL to free a tensor: a deadlock that hung about one run in five.
            del trainer
            gc.collect()
            dist.destroy_process_group()


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
    except SecondInterrupt:
        print("\nstopped at once by a second interrupt, without saving; the last checkpoint is intact",
              file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before training began (loading the model or the data)
        print("\ninterrupted before training started", file=sys.stderr, flush=True)
        return 130
