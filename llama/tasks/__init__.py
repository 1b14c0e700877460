"""Fine-tuning tasks as plug-ins: each module here is one task, and REGISTRY is the one list of them.

A task (a subclass of `Task`, the module's TASK) owns everything that makes it that task: its flags
(a dataclass of option() fields, which finetune.py's settings inherit), how its rows become examples
and batches, its objective and validation metrics, its model head, and what it records in a checkpoint.
The rest of the library asks this registry, never a task's name: finetune.py builds a run with the task
its --task names; load_pretrained, generate.py, llama.plot and --resume read the task from the run's own
record (task.json in each checkpoint; train_state.json's settings in a run folder made before task.json
existed; and, for the oldest exported classifiers, the file their task writes).

Adding a task: one module here that defines TASK, one line in REGISTRY, and its tests.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.nn as nn

RECORD_FILE = "task.json"  # in every checkpoint of a fine-tuning run: {"task": NAME}


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered task: where it is defined, and what generate.py must know before it imports torch."""

    module: str  # defines TASK
    answers: str | None = None  # generate.py's flag that runs the task's models, which write no text, on lines


# name -> entry; the order is --task's
REGISTRY = {
    "sft": Entry("llama.tasks.sft"),
    "classify": Entry("llama.tasks.classify", answers="--classify"),
    "dpo": Entry("llama.tasks.dpo"),
    "grpo": Entry("llama.tasks.grpo"),
}


class Task:
    """What one fine-tuning task is. The defaults are a language-model task's; a task overrides what differs.

    Settings: the dataclass holding the task's own flags (option() fields, grouped under the task's
    heading). DEFINES_RUN: those of them that --resume compares; the others may change between a run and
    its resumption.
    """

    name: str = ""
    summary: str = ""  # one line for --task's help
    Settings: type = object
    DEFINES_RUN: tuple[str, ...] = ()
    generates = True  # the trained model writes text (generate.py, serve.py, evaluate.py use it)
    loss_label = "loss (nats per token)"  # the loss's unit, as llama.plot labels its axis
    metrics_drawn: tuple[str, ...] = ()  # what llama.plot draws beside the loss without --metrics
    units = "rows"  # what the training set counts, for the console line
    needs_dataset = True  # False: the task makes its own rows (a synthetic task)
    default_beta: float | None = None  # a task that reads --beta: its default
    beta_help = ""  # and what --beta means to it

    # --- settings ------------------------------------------------------------------------------------
    def check(self, s: Any) -> None:
        """Raise ValueError for settings this task cannot use (one line naming the flag and the fix)."""

    # --- data ----------------------------------------------------------------------------------------
    def rows(self, s: Any) -> Any:
        """The rows of --dataset (a list, or a datasets.Dataset for a hub id)."""
        from ..rows import load_rows
        return load_rows(s.dataset[0] if len(s.dataset) == 1 else s.dataset, split=s.split)

    def dataset(self, s: Any, model: nn.Module, tokenizer: Any, rows: Any, numbers: list[int],
                train: Any = None) -> Any:
        """The examples of rows[numbers]: the training set (train None), or the validation set made to
        match `train`."""
        raise NotImplementedError

    def token_ids(self, dataset: Any) -> Iterator[Any]:
        """Every sequence of token ids the examples feed the model, for the vocabulary check."""
        for i in range(len(dataset)):
            yield dataset[i]["input_ids"]
            yield dataset[i]["targets"]

    def collate(self, examples: list[Mapping[str, Any]], pad_id: int) -> Any:
        from ..batch import collate
        return collate(examples, pad_id)

    def batches(self, s: Any, model: nn.Module, tokenizer: Any, train: Any, dist_info: Any) -> Any:
        """The training batches: an iterator with state_dict()/load_state_dict() for --resume."""
        from ..examples import SFTBatches
        return SFTBatches(train, s.batch_size, pack=getattr(s, "pack", False), seed=s.seed, rank=dist_info.rank,
                          world_size=dist_info.world_size, collate_fn=self.collate)

    def eval_batches(self, s: Any, val: Any) -> Callable[[], list[Any]]:
        """The fixed validation batches, made once."""
        from ..examples import LengthGroupedSampler
        order = LengthGroupedSampler(val.lengths, s.batch_size, seed=s.seed).batches(0)
        fixed = [self.collate([val[i] for i in indices], val.pad_id) for indices in order]
        return lambda: fixed

    # --- model and objective -------------------------------------------------------------------------
    def model(self, s: Any, model: nn.Module, train: Any) -> nn.Module:
        """The model this task trains, made from the loaded one (a new head, say)."""
        return model

    def before_adapters(self, s: Any, model: nn.Module, datasets: dict[str, Any], out: Path,
                        identity: dict[str, Any], dist_info: Any) -> Callable[[], None] | None:
        """Work on the model as loaded, before LoRA adapters go on (DPO's reference pass). Writes nothing:
        what it must write into the run folder `out`, it returns as a function that the Trainer calls once
        the run is sure to start (after --resume's checks), so that a refused command leaves the folder as
        it was (None: nothing to write)."""

    def after_adapters(self, model: nn.Module) -> None:
        """With LoRA: what trains besides the adapters."""

    def objective(self, s: Any) -> Any:
        """What the Trainer minimizes (None: the per-token cross-entropy, trainer.TokenLoss)."""
        return None

    def eval_metrics(self, s: Any, tokenizer: Any) -> Callable[..., dict[str, float]] | None:
        """The Trainer's eval_metrics(model, batches), which replaces the validation's loss pass (None: the
        objective's loss and metrics on the validation batches)."""
        return None

    def sample(self, s: Any, tokenizer: Any) -> Any:
        """The prompt answered at each validation, through the run's template (None: none)."""
        if not (self.generates and s.sample_prompt):
            return None
        from ..templates import user_prompt
        return user_prompt(tokenizer, s.sample_prompt, s.template, response=s.output_field)

    def describe(self, model: nn.Module) -> str:
        """What the console line adds about the model (its labels, say)."""
        return ""

    # --- what a checkpoint holds, and loading it -----------------------------------------------------
    def owns(self, model: nn.Module) -> bool:
        """Whether `model` carries this task's head (so a checkpoint of it records this task)."""
        return False

    def files(self, model: nn.Module) -> dict[str, Any]:
        """JSON files this task writes into each checkpoint of `model`, by name."""
        return {}

    def builder(self, folder: Path) -> Callable[[Any], nn.Module] | None:
        """How to make the model of a checkpoint folder recorded as this task, from its LlamaConfig
        (None: a plain Llama)."""
        return None

    FILES: tuple[str, ...] = ()  # the names of the files that files() writes

    def check_hf_export(self) -> None:
        """Raise ValueError when a model with this task's head has no Hugging Face form."""

    def what(self, model: nn.Module) -> str:
        """The model, as an error line names it."""
        return f"a model trained by --task {self.name}"

    needs_language_model = "it needs a language model"  # the end of the line refusing a model that cannot generate

    def recognizes(self, folder: Path) -> bool:
        """For folders written before task.json: whether the folder holds a file only this task writes."""
        return False

    # --- generate.py, for a task whose models write no text (REGISTRY's `answers` flag) -----------------
    generate_hint = "to run it"  # how generate.py's refusal ends: "pass FLAG <hint>"

    def not_mine(self, path: Any) -> str:
        """The line refusing a model of another task given to generate.py with this task's flag."""
        return f"{path} was not trained by --task {self.name}"

    def answer_lines(self, model: nn.Module, tokenizer: Any, text: str) -> Iterator[str]:
        """generate.py with the task's `answers` flag: one output line per non-blank line of `text`."""
        raise NotImplementedError


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Task:
    """The task registered as `name`; ValueError listing the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name].module).TASK


def every() -> Iterable[Task]:
    return (get(name) for name in REGISTRY)


def of_model(model: nn.Module) -> Task | None:
    """The task whose head `model` carries (None: a plain language model)."""
    return next((t for t in every() if t.owns(model)), None)


def recorded(folder: str | Path) -> Task | None:
    """The task a checkpoint folder (or a run folder: its latest checkpoint) was trained for, from its own
    record; None for a plain language model (pretrained, or a folder from elsewhere)."""
    folder = Path(folder)
    if (folder / "latest").is_file():  # a run folder: its newest checkpoint (checkpoint.LATEST)
        folder = folder / (folder / "latest").read_text(encoding="utf-8").strip()
    if (folder / RECORD_FILE).is_file():
        return get(_read_json(folder / RECORD_FILE)["task"])
    state = folder / "train_state.json"
    if state.is_file():  # a checkpoint made before task.json: its run settings name the task
        name = _read_json(state).get("run_identity", {}).get("task")
        if name in REGISTRY:
            return get(name)
    return next((t for t in every() if t.recognizes(folder)), None)


def record(model: nn.Module, task: Task | None = None) -> dict[str, Any]:
    """The files a checkpoint of `model` holds about its task: task.json and the task's own."""
    task = task or of_model(model)
    return {} if task is None else {RECORD_FILE: {"task": task.name}, **task.files(model)}


def file_names() -> frozenset[str]:
    """Every file a task may write into a model folder (task.json included)."""
    return frozenset({RECORD_FILE, *(name for t in every() for name in t.FILES)})


def builder(folder: Path) -> Callable[[Any], nn.Module] | None:
    """How to make the model of a checkpoint folder from its LlamaConfig (None: a plain Llama)."""
    task = recorded(folder)
    return None if task is None else task.builder(folder)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); copy the checkpoint folder again") from None
