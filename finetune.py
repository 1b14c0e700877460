"""Supervised fine-tuning on instruction or chat data, or sequence classification, with train.py's loop.

    python finetune.py --model SmolLM2-135M-Instruct.Q4_1.gguf --dataset alpaca_data.json --template model \
        --max-steps 300 --out checkpoints/smollm2-alpaca
    python finetune.py --model checkpoints/pretrained --dataset oasst.jsonl --template chat --lora-rank 16
    python finetune.py --task classify --model checkpoints/pretrained --dataset tweets.csv \
        --text-field text --label-field sentiment --out checkpoints/tweets

Only the responses (assistant turns) count in the loss unless --train-on-prompt, and the end-of-text
token after each response always counts: the model learns to stop. --no-special-tokens instead
fine-tunes on plain text alone (--template '{text}' --output-field text), as domain fine-tuning does.
Batches are padded to their longest example and grouped by length, or packed with --pack. The run
folder's step_N checkpoints load with generate.py; Ctrl-C saves, --resume continues exactly.

--task classify puts a new label head on the model (llama/classify.py) and trains it and the model to
give each row's text the row's label; validation adds accuracy, macro-F1 and the Matthews correlation.
The checkpoints classify with `generate.py --classify`.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from llama import load_pretrained
from llama.classify import ClassificationDataset, LlamaClassifier, check_labels, evaluate_classifier
from llama.lora import TARGETS, apply_lora
from llama.sft import FORMATS, FineTuningDataset, LengthGroupedSampler, SFTBatches, collate, load_rows
from llama.templates import user_prompt
from llama.trainer import Distributed, Trainer, TrainConfig, check_run_folder, run_training

# Settings that may change when resuming; everything else must match the checkpoint's.
RESUMABLE_CHANGES = {"max_steps", "epochs", "eval_every", "save_every", "keep_last", "compile", "resume", "out",
                     "sample_prompt", "save_adapter_only"}
# Left out of an SFT run's settings, so that SFT runs begun before --task existed still resume.
CLASSIFY_SETTINGS = {"task", "text_field", "text_pair_field", "label_field", "labels"}
# Left out of a run's settings when off, so that runs begun before the flag existed still resume.
LATER_FLAGS = {"no_special_tokens"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--task", choices=("sft", "classify"), default="sft",
                   help="sft: learn the responses of instruction or chat rows; classify: learn each text's label "
                        "with a new label head (default: sft)")
    g.add_argument("--model", required=True, help="our checkpoint or run folder, a Hugging Face Llama folder, or a .gguf file")
    g.add_argument("--dataset", required=True, nargs="+",
                   help="local .json/.jsonl/.csv/.parquet files, or a Hugging Face dataset id")
    g.add_argument("--split", default="train", help="split of a Hugging Face dataset (default: train)")
    g.add_argument("--format", default="auto", choices=FORMATS,
                   help="sft row shape: alpaca (instruction/input/output), chat (messages of role/content), sharegpt "
                        "(conversations of from/value), or auto from the first row (default)")
    g.add_argument("--template", default="alpaca",
                   help="sft: alpaca, chat (the article's <|role|> format), model (the model's own chat template), or "
                        "a format string ending with the response field, e.g. 'Q: {instruction}\\nA: {output}', or "
                        "'{text}' with --output-field text for plain text, every token counted (default: alpaca)")
    g.add_argument("--instruction-field", default="instruction", help="alpaca rows: instruction field")
    g.add_argument("--input-field", default="input", help="alpaca rows: optional input field")
    g.add_argument("--output-field", default="output", help="alpaca rows: response field")
    g.add_argument("--messages-field", default=None,
                   help="chat rows: the list of messages (default: messages, or conversations for sharegpt)")
    g.add_argument("--max-rows", type=int, default=None, help="use only the first N rows of --dataset")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="share of --dataset's rows held out for validation (default: 0.05; none with --val-dataset)")
    g.add_argument("--val-dataset", nargs="+", default=None,
                   help="validate on these rows instead (a dev split, say), in --dataset's forms; then every "
                        "--dataset row trains (default: a --val-fraction split of --dataset)")
    g.add_argument("--val-split", default="validation",
                   help="split of a Hugging Face dataset given to --val-dataset (default: validation)")
    g.add_argument("--out", default="checkpoints/finetune", help="run folder (default: checkpoints/finetune)")
    g = p.add_argument_group("classification (--task classify)")
    g.add_argument("--text-field", default="text",
                   help="the field holding the text to classify (default: text; GLUE's CoLA and SST-2 call it sentence)")
    g.add_argument("--text-pair-field", default=None,
                   help="a second text for sentence-pair tasks, joined to the first with a newline (default: none)")
    g.add_argument("--label-field", default="label", help="the field holding the label, a string or an integer "
                                                           "(default: label)")
    g.add_argument("--labels", default=None,
                   help="comma-separated label names in the order of the head's outputs, e.g. "
                        "negative,neutral,positive; a row with any other label is an error (default: the training "
                        "rows' labels, sorted; integers numerically)")
    g = p.add_argument_group("examples and batches")
    g.add_argument("--max-len", type=int, default=1024,
                   help="most positions per example, capped at the model's context; longer texts to classify "
                        "keep their first tokens (default: 1024)")
    g.add_argument("--drop-long", action="store_true", help="sft: drop over-long examples instead of truncating them")
    g.add_argument("--train-on-prompt", action="store_true", help="sft: count prompt and user tokens in the loss too")
    g.add_argument("--no-special-tokens", action="store_true",
                   help="sft: add no BOT and EOT around each example, for plain-text domain fine-tuning as in the "
                        "Spock article (with --template '{text}'): every token after the first counts, and the "
                        "model learns the text but not where to stop")
    g.add_argument("--pack", action="store_true",
                   help="pack several examples into each sequence; attention stays within each example")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch per process (default: 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="passes over the training rows (default: 2)")
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps instead of --epochs")
    g = p.add_argument_group("optimizer (defaults follow the Llama fine-tuning article)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine (default: 0)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default: 0)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.99), help="AdamW betas (default: 0.9 0.99)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0,
                   help=f"train rank-R adapters on {', '.join(TARGETS)} instead of all weights (default: 0, off)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    g.add_argument("--save-adapter-only", action="store_true",
                   help="checkpoints hold the adapters, not merged weights (they load on top of --model)")
    g = p.add_argument_group("speed, reporting and saving")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto is bfloat16 on CUDA and float32 on CPU (default: auto)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--eval-every", type=int, default=100, help="validate every N steps, and at the end (default: 100)")
    g.add_argument("--sample-prompt", default="Give three tips for staying healthy.",
                   help="sft: user message answered at each validation, through the template ('' for none)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps, and at the end (default: 500)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (default: 2)")
    g.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    g.add_argument("--seed", type=int, default=0, help="seed for the validation split and batch order (default: 0)")
    args = p.parse_args(argv)
    if args.val_dataset and args.val_fraction is not None:
        p.error("--val-fraction and --val-dataset both choose the validation rows; give one of them")
    if args.val_fraction is None:
        args.val_fraction = 0.0 if args.val_dataset else 0.05
    if args.save_adapter_only and not args.lora_rank:
        p.error("--save-adapter-only needs --lora-rank")
    if args.save_adapter_only and args.task == "classify":
        p.error("--save-adapter-only would leave the trained label head out of the checkpoints; "
                "leave it out with --task classify")
    return args


def split_rows(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Numbers of the training rows and of a seeded random choice of validation rows, each in order."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    held = set(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:round(count * val_fraction)]
               .tolist())
    return [i for i in range(count) if i not in held], sorted(held)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_training(lambda dist_info: build(args, dist_info), args.resume)


def build(args: argparse.Namespace, dist_info: Distributed) -> tuple[Trainer, str]:
    """The model, data and Trainer for a fine-tuning run, and a line that describes it."""
    out = Path(args.out)
    check_run_folder(out, args.resume, dist_info)
    model, tokenizer = load_pretrained(args.model)
    rows = load_rows(args.dataset[0] if len(args.dataset) == 1 else args.dataset, split=args.split)
    if args.max_rows:  # a datasets.Dataset slices into columns, so select rows explicitly
        rows = rows.select(range(min(args.max_rows, len(rows)))) if hasattr(rows, "select") else rows[:args.max_rows]
    if args.val_dataset:
        val_rows = load_rows(args.val_dataset[0] if len(args.val_dataset) == 1 else args.val_dataset,
                             split=args.val_split)
        train_numbers, val_numbers = list(range(len(rows))), list(range(len(val_rows)))
    else:
        val_rows = rows
        train_numbers, val_numbers = split_rows(len(rows), args.val_fraction, args.seed)
    torch.manual_seed(args.seed)  # a new label head and LoRA adapters start the same in every run
    classify = args.task == "classify"
    if classify:
        model, train, val = classification_data(args, model, tokenizer, rows, train_numbers, val_rows, val_numbers)
    else:
        train, val = sft_data(args, model, tokenizer, rows, train_numbers, val_rows, val_numbers)
    if dist_info.is_main:
        print(f"training rows: {train.stats}", file=sys.stderr)
    batches = SFTBatches(train, args.batch_size, pack=args.pack, seed=args.seed, rank=dist_info.rank,
                         world_size=dist_info.world_size)
    evals = None
    if val is not None:
        order = LengthGroupedSampler(val.lengths, args.batch_size, seed=args.seed).batches(0)
        fixed = [collate([val[i] for i in indices], pad_id=val.pad_id) for indices in order]
        evals = lambda: fixed  # noqa: E731
    steps_per_epoch = max(1, batches.batches_per_epoch // args.grad_accum)
    max_steps = args.max_steps or math.ceil((args.epochs or 2) * steps_per_epoch)
    if args.lora_rank:
        apply_lora(model, args.lora_rank, args.lora_alpha)
        if classify:
            model.score.requires_grad_(True)  # the new head has nothing pretrained to adapt: it trains whole
    sample = (user_prompt(tokenizer, args.sample_prompt, args.template, response=args.output_field)
              if args.sample_prompt and not classify else None)
    config = TrainConfig(max_steps=max_steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, betas=tuple(args.betas), grad_accum=args.grad_accum,
                         eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last,
                         dtype=args.dtype, compile=args.compile, seed=args.seed, sample_prompt=sample,
                         save_adapter_only=args.save_adapter_only)
    run_args = {k: v for k, v in vars(args).items() if k not in RESUMABLE_CHANGES
                and (classify or k not in CLASSIFY_SETTINGS) and (v or k not in LATER_FLAGS)}
    run_args.update(base_model=str(Path(args.model).resolve()), world_size=dist_info.world_size,
                    seq_len=train.max_len)
    trainer = Trainer(model, tokenizer, batches, evals, config, out, run_args, dist_info,
                      eval_metrics=evaluate_classifier if classify else None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    labels = f"; labels {', '.join(model.labels)}" if classify else ""
    return trainer, (f"model: {model.num_params() / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained; "
                     f"{max_steps} steps ({steps_per_epoch} per epoch){labels}; run folder {out}")


def validation_set(args: argparse.Namespace, make: Callable[[], Dataset]) -> Dataset:
    """make(); a bad row of --val-dataset is said to be there, since its row numbers count in that file."""
    if not args.val_dataset:
        return make()
    try:
        return make()
    except ValueError as e:
        raise ValueError(f"--val-dataset {e}") from None


def sft_data(args: argparse.Namespace, model, tokenizer, rows, train_numbers: list[int], val_rows,
             val_numbers: list[int]) -> tuple[FineTuningDataset, FineTuningDataset | None]:
    """Training examples of an SFT run from `rows`, and validation examples (None when there are no
    validation rows) from `val_rows`, which are `rows` unless --val-dataset is given."""
    if isinstance(model, LlamaClassifier):
        raise ValueError(f"{args.model} is a sequence classifier (labels {', '.join(model.labels)}); SFT needs a "
                         "language model, or train the classifier with --task classify")
    options = dict(tokenizer=tokenizer, template=args.template, format=args.format,
                   max_len=min(args.max_len, model.config.max_seq_len - 1), train_on_prompt=args.train_on_prompt,
                   drop_long=args.drop_long, special_tokens=not args.no_special_tokens,
                   instruction_field=args.instruction_field, input_field=args.input_field,
                   output_field=args.output_field, messages_field=args.messages_field)
    train = FineTuningDataset([rows[i] for i in train_numbers], **options)
    val = (validation_set(args, lambda: FineTuningDataset([val_rows[i] for i in val_numbers], **options))
           if val_numbers else None)
    return train, val


def classification_data(args: argparse.Namespace, model, tokenizer, rows, train_numbers: list[int], val_rows,
                        val_numbers: list[int]) -> tuple[LlamaClassifier, ClassificationDataset,
                                                         ClassificationDataset | None]:
    """The classifier (the model with a new label head, or the model itself when it is already a classifier
    for these labels) and its training and validation examples (as in sft_data)."""
    labels = None if args.labels is None else check_labels([name.strip() for name in args.labels.split(",")])
    options = dict(tokenizer=tokenizer, max_len=min(args.max_len, model.config.max_seq_len),
                   text_field=args.text_field, text_pair_field=args.text_pair_field, label_field=args.label_field)
    train = ClassificationDataset([rows[i] for i in train_numbers], labels=labels, row_numbers=train_numbers, **options)
    val = (validation_set(args, lambda: ClassificationDataset(
        [val_rows[i] for i in val_numbers], labels=train.labels, row_numbers=val_numbers, **options))
           if val_numbers else None)
    if not isinstance(model, LlamaClassifier):
        return LlamaClassifier.from_backbone(model, train.labels), train, val
    if model.labels != train.labels:
        raise ValueError(f"{args.model} classifies into {', '.join(model.labels)}, but this run's labels are "
                         f"{', '.join(train.labels)}; pass --labels {','.join(model.labels)} to keep its head")
    return model, train, val


if __name__ == "__main__":
    sys.exit(main())
