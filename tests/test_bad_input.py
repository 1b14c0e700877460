"""Bad input, one clear line: every command line against a table of bad inputs, and the defects of issue 16.

Each row of TABLE runs one command (prepare, train, finetune, generate, convert, plot, serve, download) on something
missing, empty, a folder where a file belongs, truncated, of the wrong type, corrupt, not UTF-8, or a
nonsense number, and asserts exit code 2, stderr exactly one `error: ...` line that names the file or
flag at fault, no traceback, and no file changed outside the row's own output folder (the whole
workspace is hashed before and after). By default the rows run in this process, through each command's
main(); with -m slow every row runs again as a real subprocess of the script, with bytes arguments.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import download
from llama import Llama, LlamaConfig, Tokenizer, load_pretrained, save_pretrained
from llama import convert as convert_cli
from llama import plot as plot_cli
from llama.cli import finetune, generate, prepare, serve, train

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"prepare": prepare.main, "train": train.main, "finetune": finetune.main, "generate": generate.main,
         "convert": convert_cli.main, "plot": plot_cli.main, "serve": serve.main, "download": download.main}
SCRIPTS = {"prepare": ["data/prepare.py"], "train": ["train.py"], "finetune": ["finetune.py"],
           "generate": ["generate.py"], "convert": ["-m", "llama.convert"], "plot": ["-m", "llama.plot"],
           "serve": ["serve.py"], "download": ["data/download.py"]}


@dataclasses.dataclass
class Row:
    id: str
    cli: str
    argv: list  # strings with {ws} for the workspace; bytes for arguments that are not UTF-8
    names: str  # what the one line must name: the file or the flag (with {ws})
    stdin: bytes = b""
    own: str | None = None  # the row's own output folder, which may change


def row(id, cli, argv, names, **options):
    return Row(id, cli, argv.split() if isinstance(argv, str) else argv, names, **options)


TRAIN = "--preset tiny --batch-size 2 --seq-len 32 --max-steps 2 --out {ws}/out-train"
TRAIN_OK = ["--data", "{ws}/shards", "--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--max-steps", "2",
            "--out", "{ws}/out-train"]
SFT_OK = ["--model", "{ws}/model", "--dataset", "{ws}/sft.jsonl", "--max-steps", "2", "--out", "{ws}/out-sft"]
GEN_OK = ["--model", "{ws}/model", "--max-tokens", "2"]
DPO_OK = ["--task", "dpo", *SFT_OK, "--dataset", "{ws}/pairs.jsonl"]
SERVE_OK = ["--model", "{ws}/model", "--port", "0"]
NAN_LINE = "{ws}/model-nan: tensor layers.0.mlp.up_proj.weight holds NaN; the checkpoint is damaged"

TABLE = [
    # prepare
    row("prepare-missing", "prepare", "--input {ws}/nope.txt --out {ws}/out-prep", "{ws}/nope.txt", own="out-prep"),
    row("prepare-empty", "prepare", "--input {ws}/empty.txt --out {ws}/out-prep", "{ws}/empty.txt", own="out-prep"),
    row("prepare-folder", "prepare", "--input {ws}/emptydir --out {ws}/out-prep", "{ws}/emptydir", own="out-prep"),
    row("prepare-not-utf8", "prepare", "--input {ws}/latin1.txt --out {ws}/out-prep", "{ws}/latin1.txt",
        own="out-prep"),
    row("prepare-malformed-jsonl", "prepare", "--input {ws}/malformed.jsonl --out {ws}/out-prep",
        "{ws}/malformed.jsonl", own="out-prep"),
    row("prepare-truncated-json", "prepare", "--input {ws}/truncated.json --out {ws}/out-prep", "{ws}/truncated.json",
        own="out-prep"),
    row("prepare-corrupt-tokenizer", "prepare",
        "--input {ws}/corpus.txt --tokenizer {ws}/shards-badtok/tokenizer.json --out {ws}/out-prep",
        "{ws}/shards-badtok/tokenizer.json", own="out-prep"),
    row("prepare-missing-tokenizer", "prepare", "--input {ws}/corpus.txt --tokenizer {ws}/nope --out {ws}/out-prep",
        "{ws}/nope", own="out-prep"),
    row("prepare-tokenizer-is-a-loop", "prepare",
        "--input {ws}/corpus.txt --tokenizer {ws}/links/loop --out {ws}/out-prep",
        "{ws}/links/loop is a loop of symbolic links", own="out-prep"),
    row("prepare-vocab-zero", "prepare", "--input {ws}/corpus.txt --vocab-size 0 --out {ws}/out-prep", "--vocab-size",
        own="out-prep"),
    row("prepare-vocab-word", "prepare", "--input {ws}/corpus.txt --vocab-size many --out {ws}/out-prep",
        "--vocab-size", own="out-prep"),
    row("prepare-shard-tokens-zero", "prepare", "--input {ws}/corpus.txt --shard-tokens 0 --out {ws}/out-prep",
        "--shard-tokens", own="out-prep"),
    row("prepare-val-fraction", "prepare", "--input {ws}/corpus.txt --val-fraction 1.5 --out {ws}/out-prep",
        "--val-fraction", own="out-prep"),
    row("prepare-val-docs", "prepare", "--input {ws}/corpus.txt --val-docs -1 --out {ws}/out-prep", "--val-docs",
        own="out-prep"),
    row("prepare-foreign-out", "prepare", "--input {ws}/corpus.txt --vocab-size 300 --out {ws}/foreign",
        "{ws}/foreign"),
    row("prepare-out-holding-a-tokenizer", "prepare", "--input {ws}/corpus.txt --vocab-size 300 --out {ws}/tokenizer-only",
        "{ws}/tokenizer-only"),
    row("prepare-out-file", "prepare", "--input {ws}/corpus.txt --vocab-size 300 --out {ws}/corpus.txt",
        "{ws}/corpus.txt"),
    row("prepare-no-out", "prepare", "--input {ws}/corpus.txt", "--out"),
    row("prepare-unknown-flag", "prepare", "--input {ws}/corpus.txt --out {ws}/out-prep --bogus", "--bogus",
        own="out-prep"),
    # train
    row("train-missing-data", "train", "--data {ws}/nope " + TRAIN, "{ws}/nope", own="out-train"),
    row("train-data-file", "train", "--data {ws}/corpus.txt " + TRAIN, "{ws}/corpus.txt", own="out-train"),
    row("train-data-empty-folder", "train", "--data {ws}/emptydir " + TRAIN, "{ws}/emptydir", own="out-train"),
    row("train-corrupt-tokenizer", "train", "--data {ws}/shards-badtok " + TRAIN, "{ws}/shards-badtok/tokenizer.json",
        own="out-train"),
    row("train-corrupt-meta", "train", "--data {ws}/shards-badmeta " + TRAIN, "{ws}/shards-badmeta/meta.json",
        own="out-train"),
    row("train-wrong-meta", "train", "--data {ws}/shards-wrongmeta " + TRAIN, "{ws}/shards-wrongmeta/meta.json",
        own="out-train"),
    row("train-truncated-shard", "train", "--data {ws}/shards-short " + TRAIN, "{ws}/shards-short/train_000000.bin",
        own="out-train"),
    row("train-no-data", "train", TRAIN, "--data", own="out-train"),
    row("train-config-missing", "train", ["--config", "{ws}/nope.json", *TRAIN_OK], "{ws}/nope.json", own="out-train"),
    row("train-config-folder", "train", ["--config", "{ws}/emptydir", *TRAIN_OK], "{ws}/emptydir", own="out-train"),
    row("train-config-array", "train", ["--config", "{ws}/config-array.json", *TRAIN_OK], "{ws}/config-array.json",
        own="out-train"),
    row("train-config-truncated", "train", ["--config", "{ws}/config-truncated.json", *TRAIN_OK],
        "{ws}/config-truncated.json", own="out-train"),
    row("train-config-float-steps", "train", ["--config", "{ws}/config-float.json", *TRAIN_OK[:-2], "--out",
                                              "{ws}/out-train"], "max_steps", own="out-train"),
    row("train-config-unknown-preset", "train", ["--config", "{ws}/config-preset.json", "--data", "{ws}/shards",
                                                 "--out", "{ws}/out-train"], "preset", own="out-train"),
    row("train-config-resume-string", "train", ["--config", "{ws}/config-resume.json", *TRAIN_OK], "resume",
        own="out-train"),
    row("train-config-unknown-key", "train", ["--config", "{ws}/config-unknown.json", *TRAIN_OK], "bogus",
        own="out-train"),
    row("train-config-not-utf8", "train", ["--config", "{ws}/latin1.txt", *TRAIN_OK], "{ws}/latin1.txt",
        own="out-train"),
    *[row(f"train-{flag.strip('-')}-{value}", "train", [*TRAIN_OK, flag, value], flag, own="out-train")
      for flag, value in [("--max-steps", "0"), ("--max-steps", "-3"), ("--max-tokens", "-1"), ("--batch-size", "0"),
                          ("--seq-len", "0"), ("--grad-accum", "0"), ("--lr", "-1"), ("--lr", "nan"),
                          ("--min-lr", "-1"), ("--warmup-steps", "-1"), ("--weight-decay", "-0.1"),
                          ("--log-every", "0"), ("--eval-every", "-1"), ("--eval-tokens", "0"), ("--save-every", "-1"),
                          ("--keep-last", "-1"), ("--seed", "-1"), ("--max-steps", "ten"), ("--preset", "huge"),
                          ("--tokens-per-step", "100"), ("--num-heads", "3"), ("--eval-tasks", "bogus"),
                          ("--eval-tasks", "piqa:0"), ("--eval-tasks", "piqa:x")]],
    row("train-eval-task-data-missing", "train",
        [*TRAIN_OK, "--eval-tasks", "piqa", "--eval-data-dir", "{ws}/emptydir"], "python3 data/download.py piqa",
        own="out-train"),
    row("train-foreign-out", "train", [*TRAIN_OK[:-2], "--data", "{ws}/shards", "--out", "{ws}/foreign"],
        "{ws}/foreign"),
    row("train-old-run-without-latest", "train", [*TRAIN_OK[:-2], "--out", "{ws}/oldrun"], "{ws}/oldrun"),
    row("train-resume-foreign", "train", [*TRAIN_OK[:-2], "--out", "{ws}/foreign", "--resume"], "{ws}/foreign"),
    row("train-out-file", "train", [*TRAIN_OK[:-2], "--out", "{ws}/corpus.txt"], "{ws}/corpus.txt"),
    # finetune
    row("finetune-missing-dataset", "finetune", [*SFT_OK, "--dataset", "{ws}/nope.jsonl"], "{ws}/nope.jsonl",
        own="out-sft"),
    row("finetune-empty-dataset", "finetune", [*SFT_OK, "--dataset", "{ws}/empty.jsonl"], "{ws}/empty.jsonl",
        own="out-sft"),
    row("finetune-folder-dataset", "finetune", [*SFT_OK, "--dataset", "{ws}/emptydir/x.jsonl"],
        "{ws}/emptydir/x.jsonl", own="out-sft"),
    row("finetune-truncated-json", "finetune", [*SFT_OK, "--dataset", "{ws}/truncated.json"], "{ws}/truncated.json",
        own="out-sft"),
    row("finetune-malformed-jsonl", "finetune", [*SFT_OK, "--dataset", "{ws}/malformed.jsonl"],
        "{ws}/malformed.jsonl line 3", own="out-sft"),
    row("finetune-not-utf8", "finetune", [*SFT_OK, "--dataset", "{ws}/latin1.jsonl"], "{ws}/latin1.jsonl",
        own="out-sft"),
    row("finetune-wrong-type", "finetune", [*SFT_OK, "--dataset", "{ws}/corpus.txt"], "{ws}/corpus.txt",
        own="out-sft"),
    row("finetune-array-not-rows", "finetune", [*SFT_OK, "--dataset", "{ws}/numbers.json"], "{ws}/numbers.json",
        own="out-sft"),
    row("finetune-bad-row", "finetune", [*SFT_OK, "--dataset", "{ws}/badrow.jsonl"], "{ws}/badrow.jsonl row 7",
        own="out-sft"),
    row("finetune-missing-model", "finetune", [*SFT_OK, "--model", "{ws}/nope"], "{ws}/nope", own="out-sft"),
    row("finetune-corrupt-tokenizer", "finetune", [*SFT_OK, "--model", "{ws}/model-badtok"],
        "{ws}/model-badtok/tokenizer.json", own="out-sft"),
    row("finetune-truncated-weights", "finetune", [*SFT_OK, "--model", "{ws}/model-truncated"],
        "{ws}/model-truncated/model.safetensors", own="out-sft"),
    row("finetune-corrupt-config", "finetune", [*SFT_OK, "--model", "{ws}/model-badconfig"],
        "{ws}/model-badconfig/config.json", own="out-sft"),
    row("finetune-big-tokenizer", "finetune", [*SFT_OK, "--model", "{ws}/model-bigtok"], "{ws}/model-bigtok",
        own="out-sft"),
    *[row(f"finetune-{flag.strip('-')}-{'-'.join(values)}", "finetune", [*SFT_OK, flag, *values], flag, own="out-sft")
      for flag, *values in [("--grad-accum", "0"), ("--lora-rank", "100000"), ("--lora-rank", "-1"),
                            ("--epochs", "-1"), ("--epochs", "0"), ("--max-steps", "0"), ("--lr", "-1"),
                            ("--batch-size", "0"), ("--val-fraction", "1"), ("--max-len", "1"), ("--keep-last", "-2"),
                            ("--betas", "0.9", "1.5"), ("--max-rows", "0"), ("--lora-alpha", "0"),
                            ("--max-steps", "x"), ("--task", "summarize"), ("--eval-tasks", "bogus"),
                            ("--eval-tasks", "piqa:0"), ("--eval-tasks", "piqa:x")]],
    row("finetune-eval-task-data-missing", "finetune",
        [*SFT_OK, "--eval-tasks", "piqa", "--eval-data-dir", "{ws}/emptydir"], "python3 data/download.py piqa",
        own="out-sft"),
    row("finetune-no-dataset", "finetune", ["--model", "{ws}/model", "--out", "{ws}/out-sft"], "--dataset",
        own="out-sft"),
    row("finetune-foreign-out", "finetune", [*SFT_OK, "--out", "{ws}/foreign"], "{ws}/foreign"),
    row("finetune-one-label", "finetune", ["--task", "classify", *SFT_OK, "--dataset", "{ws}/classify.csv", "--labels",
                                           "big"], "--labels", own="out-sft"),
    row("finetune-dpo-bad-pair", "finetune", [*DPO_OK, "--dataset", "{ws}/badpairs.jsonl"], "{ws}/badpairs.jsonl row 7",
        own="out-sft"),
    row("finetune-dpo-sft-rows", "finetune", [*DPO_OK, "--dataset", "{ws}/sft.jsonl"], "{ws}/sft.jsonl row 0",
        own="out-sft"),
    row("finetune-dpo-beta-0", "finetune", [*DPO_OK, "--beta", "0"], "--beta", own="out-sft"),
    row("finetune-dpo-pack", "finetune", [*DPO_OK, "--pack"], "--pack", own="out-sft"),
    # generate
    row("generate-missing-model", "generate", [*GEN_OK, "--model", "{ws}/nope", "--prompt", "hi"], "{ws}/nope"),
    row("generate-corrupt-tokenizer", "generate", [*GEN_OK, "--model", "{ws}/model-badtok", "--prompt", "hi"],
        "{ws}/model-badtok/tokenizer.json"),
    row("generate-truncated-weights", "generate", [*GEN_OK, "--model", "{ws}/model-truncated", "--prompt", "hi"],
        "{ws}/model-truncated/model.safetensors"),
    row("generate-corrupt-config", "generate", [*GEN_OK, "--model", "{ws}/model-badconfig", "--prompt", "hi"],
        "{ws}/model-badconfig/config.json"),
    row("generate-big-tokenizer", "generate", [*GEN_OK, "--model", "{ws}/model-bigtok", "--prompt", "hi"],
        "{ws}/model-bigtok"),
    row("generate-prompt-not-utf8", "generate", [*GEN_OK, "--prompt", b"caf\xe9"], "--prompt"),
    row("generate-stdin-not-utf8", "generate", [*GEN_OK, "--prompt-file", "-"], "stdin", stdin=b"caf\xe9 au lait\n"),
    row("generate-chat-stdin-not-utf8", "generate", [*GEN_OK, "--chat"], "stdin", stdin=b"\xff\xfe hi\n"),
    row("generate-prompt-file-missing", "generate", [*GEN_OK, "--prompt-file", "{ws}/nope.txt"], "{ws}/nope.txt"),
    row("generate-prompt-file-folder", "generate", [*GEN_OK, "--prompt-file", "{ws}/emptydir"], "{ws}/emptydir"),
    row("generate-prompt-file-not-utf8", "generate", [*GEN_OK, "--prompt-file", "{ws}/latin1.txt"], "{ws}/latin1.txt"),
    row("generate-prompt-file-empty", "generate", [*GEN_OK, "--prompt-file", "{ws}/empty.txt"], "prompt"),
    *[row(f"generate-{flag.strip('-')}-{value}", "generate", [*GEN_OK, "--prompt", "hi", flag, value], flag)
      for flag, value in [("--max-tokens", "0"), ("--temperature", "-1"), ("--top-p", "2"), ("--top-k", "-1"),
                          ("--repetition-penalty", "0"), ("--max-tokens", "lots"), ("--dtype", "int8")]],
    row("generate-classify-a-language-model", "generate", [*GEN_OK, "--classify", "--prompt", "hi"], "{ws}/model"),
    row("generate-nan-weights", "generate", [*GEN_OK, "--model", "{ws}/model-nan", "--prompt", "hi"], NAN_LINE),
    row("generate-quantize-on-cuda", "generate", [*GEN_OK, "--prompt", "hi", "--quantize", "int8", "--device", "cuda"],
        "--quantize int8 runs on the CPU only"),
    row("generate-quantize-int3", "generate", [*GEN_OK, "--prompt", "hi", "--quantize", "int3"], "--quantize"),
    row("generate-quantize-a-classifier", "generate", [*GEN_OK, "--classify", "--prompt", "hi", "--quantize", "int4"],
        "--quantize"),
    # convert
    row("convert-missing-source", "convert", "{ws}/nope {ws}/out-conv", "{ws}/nope", own="out-conv"),
    row("convert-text-source", "convert", "{ws}/corpus.txt {ws}/out-conv", "{ws}/corpus.txt", own="out-conv"),
    row("convert-source-without-config", "convert", "{ws}/emptydir {ws}/out-conv", "{ws}/emptydir", own="out-conv"),
    row("convert-truncated-weights", "convert", "{ws}/model-truncated {ws}/out-conv",
        "{ws}/model-truncated/model.safetensors", own="out-conv"),
    row("convert-corrupt-config", "convert", "{ws}/model-badconfig {ws}/out-conv", "{ws}/model-badconfig/config.json",
        own="out-conv"),
    row("convert-in-place-on-a-checkpoint", "convert", "{ws}/run/step_0000002 {ws}/run/step_0000002",
        "{ws}/run/step_0000002"),
    row("convert-into-a-run-folder", "convert", "{ws}/run {ws}/run", "{ws}/run"),
    row("convert-into-a-foreign-folder", "convert", "{ws}/model {ws}/foreign", "{ws}/foreign"),
    row("convert-over-a-model-without-overwrite", "convert", "{ws}/model {ws}/converted", "{ws}/converted"),
    row("convert-to-a-file", "convert", "{ws}/model {ws}/corpus.txt", "{ws}/corpus.txt"),
    row("convert-read-only-destination", "convert", "{ws}/model {ws}/ro/x", "{ws}/ro"),
    row("convert-full-destination", "convert", "{ws}/model {ws}/full/x", "{ws}/full"),
    row("convert-bad-dtype", "convert", "{ws}/model {ws}/out-conv --dtype int8", "--dtype", own="out-conv"),
    row("convert-nan-weights", "convert", "{ws}/model-nan {ws}/out-conv", NAN_LINE, own="out-conv"),
    # plot
    row("plot-missing-run", "plot", "{ws}/nope", "{ws}/nope"),
    row("plot-run-without-metrics", "plot", "{ws}/emptydir", "{ws}/emptydir"),
    row("plot-run-is-a-file", "plot", "{ws}/corpus.txt", "{ws}/corpus.txt"),
    row("plot-malformed-metrics", "plot", "{ws}/metrics-broken", "{ws}/metrics-broken/metrics.jsonl line 2"),
    row("plot-wrong-metrics", "plot", "{ws}/metrics-wrong", "{ws}/metrics-wrong/metrics.jsonl"),
    row("plot-not-utf8-metrics", "plot", "{ws}/metrics-latin1", "{ws}/metrics-latin1/metrics.jsonl"),
    row("plot-read-only-destination", "plot", "{ws}/run --out {ws}/ro/loss.png", "{ws}/ro/loss.png"),
    row("plot-full-destination", "plot", "{ws}/run --out {ws}/full/loss.png", "{ws}/full"),
    row("plot-out-is-a-folder", "plot", "{ws}/run --out {ws}/emptydir", "{ws}/emptydir"),
    row("plot-unknown-image-type", "plot", "{ws}/run --out {ws}/out-plot/loss.xyz", "{ws}/out-plot/loss.xyz",
        own="out-plot"),
    # plot writes over nothing but a plot it drew (marked): not a run's files, a device, a FIFO, someone's picture
    row("plot-out-is-latest", "plot", "{ws}/run --out {ws}/run/latest",
        "{ws}/run/latest exists and is not a plot that llama.plot drew"),
    row("plot-out-is-a-device", "plot", "{ws}/run --out /dev/null", "/dev/null exists and is not a plot"),
    row("plot-out-is-a-fifo", "plot", "{ws}/run --out {ws}/special/fifo.png",
        "{ws}/special/fifo.png exists and is not"),
    row("plot-out-is-someones-png", "plot", "{ws}/run --out {ws}/special/photo.png",
        "{ws}/special/photo.png exists and is not a plot that llama.plot drew"),
    row("plot-run-is-a-loop", "plot", "{ws}/links/loop", "{ws}/links/loop is a loop of symbolic links"),
    # issue 17: output paths that are not UTF-8, foreign files named like ours, resuming another command's run,
    # a refused resume that wrote first, a symlink loop said to be missing, a failed run that left a folder
    row("train-out-not-utf8", "train", [*TRAIN_OK[:-2], "--out", b"{ws}/caf\xe9"],
        "--out {ws}/caf\\xe9 is not valid UTF-8"),
    row("finetune-out-not-utf8", "finetune", [*SFT_OK[:-2], "--out", b"{ws}/caf\xe9"],
        "--out {ws}/caf\\xe9 is not valid UTF-8"),
    row("prepare-out-not-utf8", "prepare",
        ["--input", "{ws}/corpus.txt", "--vocab-size", "300", "--out", b"{ws}/caf\xe9"], "--out {ws}/caf\\xe9 is not valid UTF-8"),
    row("train-resume-a-foreign-step-folder", "train", [*TRAIN_OK[:-2], "--out", "{ws}/foreign-step", "--resume"],
        "{ws}/foreign-step holds step_0000001, which is not a checkpoint of a run"),
    row("prepare-foreign-file-named-like-a-shard", "prepare",
        "--input {ws}/corpus.txt --vocab-size 300 --out {ws}/foreign-shard",
        "{ws}/foreign-shard holds files that data/prepare.py did not write (train_000000.bin)"),
    row("finetune-resume-dpo-run-without-task", "finetune", [*SFT_OK[:-2], "--dataset", "{ws}/pairs.jsonl", "--out",
                                                             "{ws}/dporun", "--resume"],
        "{ws}/dporun is a run of finetune.py --task dpo; resume it with finetune.py --task dpo --resume"),
    row("train-resume-a-finetune-run", "train", [*TRAIN_OK[:-2], "--out", "{ws}/dporun", "--resume"],
        "{ws}/dporun is a run of finetune.py --task dpo"),
    row("finetune-dpo-refused-resume-writes-nothing", "finetune",  # other pairs: a new reference, not written
        [*DPO_OK, "--out", "{ws}/dporun", "--resume", "--lr", "0.001", "--max-rows", "30"],
        "cannot resume {ws}/dporun/step_0000001"),
    row("finetune-failed-leaves-no-out-folder", "finetune", [*SFT_OK[:-2], "--dataset", "{ws}/nope.jsonl", "--out",
                                                             "{ws}/out-none"], "{ws}/nope.jsonl"),
    row("train-failed-leaves-no-out-folder", "train", ["--data", "{ws}/nope", *TRAIN_OK[2:-2], "--out",
                                                       "{ws}/out-none/deeper"], "{ws}/nope"),
    row("train-config-is-a-loop", "train", ["--config", "{ws}/links/loop", *TRAIN_OK],
        "{ws}/links/loop is a loop of symbolic links", own="out-train"),
    row("train-data-is-a-loop", "train", "--data {ws}/links/loop " + TRAIN,
        "{ws}/links/loop is a loop of symbolic links", own="out-train"),
    row("prepare-input-is-a-loop", "prepare", "--input {ws}/links/loop --out {ws}/out-prep",
        "{ws}/links/loop is a loop of symbolic links", own="out-prep"),
    row("train-read-only-out", "train", [*TRAIN_OK[:-2], "--out", "{ws}/ro/x"],
        "cannot write the run folder {ws}/ro/x"),
    row("train-out-holds-someones-lock-file", "train", [*TRAIN_OK[:-2], "--out", "{ws}/foreign-lock"],
        "{ws}/foreign-lock/.llama.lock is not the lock of a run"),
    row("train-out-is-a-loop", "train", [*TRAIN_OK[:-2], "--out", "{ws}/links/loop"],
        "cannot write the run folder {ws}/links/loop: {ws}/links/loop is a loop of symbolic links"),
    # serve (bad input is found before it listens for requests)
    row("serve-missing-model", "serve", [*SERVE_OK, "--model", "{ws}/nope"], "{ws}/nope"),
    row("serve-corrupt-tokenizer", "serve", [*SERVE_OK, "--model", "{ws}/model-badtok"],
        "{ws}/model-badtok/tokenizer.json"),
    row("serve-truncated-weights", "serve", [*SERVE_OK, "--model", "{ws}/model-truncated"],
        "{ws}/model-truncated/model.safetensors"),
    row("serve-big-tokenizer", "serve", [*SERVE_OK, "--model", "{ws}/model-bigtok"], "{ws}/model-bigtok"),
    *[row(f"serve-{flag.strip('-')}-{value or 'empty'}", "serve", [*SERVE_OK, flag, value], flag)
      for flag, value in [("--port", "70000"), ("--port", "http"), ("--max-batch", "0"), ("--max-batch", "10000000000"),
                          ("--context", "1"),
                          ("--context", "100000"), ("--api-key", ""), ("--template", "alpaca"), ("--dtype", "int8")]],
    row("serve-unknown-flag", "serve", [*SERVE_OK, "--bogus"], "--bogus"),
    row("serve-nan-weights", "serve", [*SERVE_OK, "--model", "{ws}/model-nan"], NAN_LINE),
    row("serve-quantize-on-cuda", "serve", [*SERVE_OK, "--quantize", "int4", "--device", "cuda"],
        "--quantize int4 runs on the CPU only"),
    # download (nothing is fetched: each is refused first)
    row("download-unknown-dataset", "download", "bogus --out {ws}/out-data", "bogus", own="out-data"),
    row("download-no-dataset", "download", "--out {ws}/out-data", "NAME", own="out-data"),
    row("download-unknown-flag", "download", "cola --bogus --out {ws}/out-data", "--bogus", own="out-data"),
]


# --- the workspace -------------------------------------------------------------------------------------

def mount_tmpfs(folder, options):
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return mount.returncode == 0


@pytest.fixture(scope="module")
def ws(tiny_world, tmp_path_factory, request):
    """A workspace of good and bad inputs; ro/ is read-only and full/ a full disk where mounts are allowed."""
    ws = tmp_path_factory.mktemp("bad-input")
    for name in ("corpus.txt", "sft.jsonl", "classify.csv"):
        shutil.copy(tiny_world / name, ws / name)
    for name in ("shards", "model"):
        shutil.copytree(tiny_world / name, ws / name)
    (ws / "empty.txt").write_text("")
    (ws / "empty.jsonl").write_text("")
    (ws / "emptydir").mkdir()
    (ws / "latin1.txt").write_bytes(b"caf\xe9 au lait, na\xefve\n")
    (ws / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "au lait"}\n')
    (ws / "truncated.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "out')
    good = json.dumps({"instruction": "a b", "input": "", "output": "c d"})
    (ws / "malformed.jsonl").write_text(f'{good}\n{good}\n{{"instruction": "x", "output": \n{good}\n')
    (ws / "numbers.json").write_text("[1, 2, 3]")
    rows = [json.loads(line) for line in (ws / "sft.jsonl").read_text().splitlines()]
    del rows[7]["output"]  # with 5% held out for validation, row 7 of the file is not row 7 of the training rows
    (ws / "badrow.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"instruction": r["instruction"], "input": r.get("input", ""), "chosen": r["output"],
              "rejected": " ".join(reversed(r["output"].split())) + " no"} for r in rows if "output" in r]
    (ws / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    pairs[7]["rejected"] = ""  # an empty response, row 7 of the file whichever rows are held out
    (ws / "badpairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    for name, text in [("config-array", "[1, 2]"), ("config-truncated", '{"max_steps": '),
                       ("config-float", '{"max_steps": 2.5}'), ("config-preset", '{"preset": "huge"}'),
                       ("config-resume", '{"resume": "no"}'), ("config-unknown", '{"bogus": 1}')]:
        (ws / f"{name}.json").write_text(text)
    for name in ("shards-badtok", "shards-badmeta", "shards-wrongmeta", "shards-short"):
        shutil.copytree(ws / "shards", ws / name)
    text = (ws / "shards" / "tokenizer.json").read_text()
    (ws / "shards-badtok" / "tokenizer.json").write_text(text[:len(text) // 2])
    (ws / "shards-badmeta" / "meta.json").write_text("{not json")
    (ws / "shards-wrongmeta" / "meta.json").write_text('{"splits": 3}')
    shard = ws / "shards-short" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    for name in ("model-badtok", "model-truncated", "model-badconfig"):
        shutil.copytree(ws / "model", ws / name)
    (ws / "model-badtok" / "tokenizer.json").write_text(text[:len(text) // 2])
    weights = ws / "model-truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (ws / "model-badconfig" / "config.json").write_text('{"hidden_size": ')
    damaged, tokenizer = load_pretrained(ws / "model")
    with torch.no_grad():
        damaged.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    save_pretrained(damaged, tokenizer, ws / "model-nan", format="ours")
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=100)), Tokenizer.load(ws / "model"),
                    ws / "model-bigtok", format="ours")
    (ws / "foreign").mkdir()
    (ws / "foreign" / "notes.txt").write_text("mine")
    (ws / "foreign" / "train_000000.bin").write_bytes(b"my own binary file")  # named like a shard
    (ws / "foreign" / "config.json").write_text("{}")
    (ws / "foreign" / "step_0000001").mkdir()
    (ws / "foreign" / "step_0000001" / "photo.jpg").write_bytes(b"\xff\xd8")
    (ws / "tokenizer-only").mkdir()  # someone's tokenizer, not prepare's: there is no meta.json or shard
    shutil.copy(ws / "shards" / "tokenizer.json", ws / "tokenizer-only" / "tokenizer.json")
    (ws / "oldrun" / "step_0000004").mkdir(parents=True)  # an old run whose latest was lost
    (ws / "oldrun" / "step_0000004" / "model.safetensors").write_bytes(b"old weights")
    (ws / "oldrun" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (ws / "foreign-step" / "step_0000001").mkdir(parents=True)  # someone's folder named like a checkpoint, no run
    (ws / "foreign-step" / "step_0000001" / "photo.jpg").write_bytes(b"\xff\xd8")
    (ws / "foreign-shard").mkdir()
    (ws / "foreign-shard" / "train_000000.bin").write_bytes(b"my own binary file")  # and nothing else
    (ws / "special").mkdir()
    os.mkfifo(ws / "special" / "fifo.png")
    (ws / "special" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG that plot did not draw
    (ws / "foreign-lock").mkdir()
    (ws / "foreign-lock" / ".llama.lock").write_text("my notes, not a process id\n")
    (ws / "links").mkdir()
    (ws / "links" / "loop").symlink_to("loop")
    assert finetune.main([*[a.format(ws=ws) for a in DPO_OK], "--out", str(ws / "dporun"), "--max-steps", "1",
                          "--eval-every", "0", "--sample-prompt", ""]) == 0
    assert train.main([*[a.format(ws=ws) for a in TRAIN_OK[:-2]], "--out", str(ws / "run"), "--eval-every", "0",
                       "--save-every", "2", "--sample-prompt", ""]) == 0
    assert convert_cli.main([str(ws / "model"), str(ws / "converted"), "--format", "ours"]) == 0
    for name, text in [("metrics-broken", '{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n{"step": 3, "loss": 4.0}\n'),
                       ("metrics-wrong", '{"step": "one", "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')]:
        (ws / name).mkdir()
        (ws / name / "metrics.jsonl").write_text(text)
    (ws / "metrics-latin1").mkdir()
    (ws / "metrics-latin1" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 5.0, "note": "caf\xe9"}\n{"step": 2}\n')
    mounted = []
    for name, options in (("ro", "ro,size=1m"), ("full", "size=64k")) if os.geteuid() == 0 else ():
        if mount_tmpfs(ws / name, options):
            mounted.append(name)
            request.addfinalizer(lambda folder=ws / name: subprocess.run(["umount", "-l", str(folder)]))
    if "full" in mounted:
        with contextlib.suppress(OSError), open(ws / "full" / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    if "ro" not in mounted and os.geteuid() != 0:
        (ws / "ro").mkdir()
        (ws / "ro").chmod(0o555)
        mounted.append("ro")
    return ws, set(mounted)


def snapshot(ws, own):
    """The hash of every file and folder name under the workspace, and of each file's bytes, but `own`."""
    digest = {}
    for path in sorted(ws.rglob("*")):
        relative = path.relative_to(ws)
        if own and relative.parts[0] == own:
            continue
        digest[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return digest


def meaningful(stderr):
    """stderr without progress bars (tqdm redraws its line with \\r)."""
    lines = [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]
    return [line for line in lines if line.strip() and "%|" not in line and " examples/s]" not in line]


def arguments(bad, ws, raw):
    """The row's argv for this workspace: bytes stay bytes for a subprocess, else decode as Python does."""
    arguments = [arg.replace(b"{ws}", os.fsencode(ws)) if isinstance(arg, bytes) else arg for arg in bad.argv]
    return [(arg if raw else os.fsdecode(arg)) if isinstance(arg, bytes) else arg.format(ws=ws) for arg in arguments]


def skip_without_mounts(bad, mounted):
    needed = {"ro", "full"} & set(Path(bad.names.format(ws="")).parts)
    if needed - mounted:
        pytest.skip(f"cannot mount the {' and '.join(sorted(needed))} tmpfs here")


def check(bad, ws, code, stderr, before):
    lines = meaningful(stderr)
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert bad.names.format(ws=ws) in lines[0], lines[0]
    assert snapshot(ws, bad.own) == before, "a file outside the row's own folder changed"


@pytest.mark.parametrize("bad", TABLE, ids=[bad.id for bad in TABLE])
def test_bad_input_gets_one_line_and_changes_nothing(ws, bad, capsys, monkeypatch):
    ws, mounted = ws
    skip_without_mounts(bad, mounted)
    before = snapshot(ws, bad.own)
    monkeypatch.chdir(ws)  # defaults such as checkpoints/run would land in the workspace, and be seen
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bad.stdin), encoding="utf-8"))
    capsys.readouterr()
    code = MAINS[bad.cli](arguments(bad, ws, raw=False))
    check(bad, ws, code, capsys.readouterr().err, before)


@pytest.mark.slow
@pytest.mark.parametrize("bad", TABLE, ids=[bad.id for bad in TABLE])
def test_bad_input_gets_one_line_from_the_scripts_too(ws, bad):
    ws, mounted = ws
    skip_without_mounts(bad, mounted)
    before = snapshot(ws, bad.own)
    result = subprocess.run([sys.executable, *SCRIPTS[bad.cli], *arguments(bad, ws, raw=True)], cwd=ROOT,
                            input=bad.stdin, capture_output=True, timeout=300)
    check(bad, ws, result.returncode, result.stderr.decode(errors="replace"), before)


def test_the_table_covers_every_command_and_kind_of_bad_input():
    assert {bad.cli for bad in TABLE} == set(MAINS)
    assert len(TABLE) >= 100 and len({bad.id for bad in TABLE}) == len(TABLE)


# --- the defects of issue 16, each with the test that keeps it out ----------------------------------------

def test_convert_replaces_only_a_model_folder_it_wrote_and_only_when_asked(ws, capsys):
    """Defect 2: convert replaced any DST holding a config.json, with all its files; run in place on a step_N
    folder it deleted train_state.*. The table's rows refuse those; --overwrite replaces a model folder."""
    ws, _ = ws
    target = ws / "out-overwrite"
    assert convert_cli.main([str(ws / "model"), str(target), "--format", "ours"]) == 0
    first = (target / "model.safetensors").read_bytes()
    assert convert_cli.main([str(ws / "run"), str(target), "--format", "ours"]) == 2
    assert capsys.readouterr().err.endswith(f"error: {target} already holds a model; pass --overwrite (overwrite=True) "
                                            "to replace it, or choose a new folder\n")
    assert convert_cli.main([str(ws / "run"), str(target), "--format", "ours", "--overwrite"]) == 0
    assert (target / "model.safetensors").read_bytes() != first  # the run's weights, not the untrained model's
    step = ws / "run" / "step_0000002"
    before = snapshot(step, None)
    assert convert_cli.main([str(step), str(step), "--format", "ours", "--overwrite"]) == 2
    assert snapshot(step, None) == before and (step / "train_state.safetensors").is_file()
    shutil.rmtree(target)


def test_a_new_run_never_writes_into_a_folder_that_holds_files(ws, capsys):
    """Defect 3: only `latest` protected --out. An old run without it, or any folder with a step_0000001/,
    had its checkpoints replaced and metrics mixed; prepare deleted shard-named files of a foreign --out."""
    ws, _ = ws
    for folder in ("oldrun", "foreign"):
        before = snapshot(ws / folder, None)
        assert train.main([*[a.format(ws=ws) for a in TRAIN_OK[:-2]], "--out", str(ws / folder)]) == 2
        assert f"error: {ws / folder} already holds " in capsys.readouterr().err
        assert snapshot(ws / folder, None) == before
    before = snapshot(ws / "foreign", None)
    assert prepare.main(["--input", str(ws / "corpus.txt"), "--vocab-size", "300", "--out", str(ws / "foreign")]) == 2
    assert capsys.readouterr().err == (f"error: {ws / 'foreign'} holds files that data/prepare.py did not write "
                                       "(config.json, notes.txt, step_0000001, train_000000.bin); prepare into a new "
                                       "or empty folder (nothing of those is deleted)\n")
    assert snapshot(ws / "foreign", None) == before
    # --resume of an old run whose latest was lost continues from its newest complete checkpoint
    lost = ws / "out-lost-latest"
    shutil.copytree(ws / "run", lost)
    (lost / "latest").unlink()
    assert train.main([*[a.format(ws=ws) for a in TRAIN_OK[:-2]], "--out", str(lost), "--eval-every", "0",
                       "--save-every", "2", "--sample-prompt", "", "--max-steps", "3", "--resume"]) == 0
    assert [json.loads(line)["step"] for line in (lost / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2, 3]
    shutil.rmtree(lost)


def test_sft_errors_name_the_row_of_the_file_with_rows_held_out(tiny_world, tmp_path, capsys):
    """Defect 6: row numbers counted within the training or validation rows, not the file."""
    from llama.rows import split_rows

    rows = [json.loads(line) for line in (tiny_world / "sft.jsonl").read_text().splitlines()]
    train_rows, held_out = split_rows(len(rows), 0.05, 0)
    for bad in (train_rows[-1], held_out[-1]):  # a training row and a validation row, both after a held-out one
        assert bad != train_rows.index(bad) if bad in train_rows else bad != held_out.index(bad)
        broken = [dict(r) for r in rows]
        del broken[bad]["output"]  # which datasets, filling the column, reads as None
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
        assert finetune.main(["--model", str(tiny_world / "model"), "--dataset", str(tmp_path / "rows.jsonl"),
                              "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: --dataset {tmp_path / 'rows.jsonl'} row {bad}: field 'output' must be a string, got NoneType")


def test_settings_refuse_nonsense_numbers_from_typed_callers_too():
    """Defect 8: --max-steps 0 trained 1000 steps, negative lengths did nothing and exited 0, --grad-accum 0
    was 1 or a ZeroDivisionError, --lr -1 failed in torch. The settings dataclasses check what they are given,
    so experiments calling run(Settings(...)) get the same one line as the flags."""
    from llama.cli.finetune import FinetuneSettings
    from llama.cli.train import TrainSettings

    for settings, field, value, message in [
            (TrainSettings, "max_steps", 0, "--max-steps must be at least 1, got 0"),
            (TrainSettings, "max_tokens", -5, "--max-tokens must be at least 1, got -5"),
            (TrainSettings, "grad_accum", 0, "--grad-accum must be at least 1, got 0"),
            (TrainSettings, "lr", -1.0, "--lr must be above 0, got -1.0"),
            (TrainSettings, "lr", float("inf"), "--lr must be above 0, got inf"),
            (TrainSettings, "max_steps", 2.5, "--max-steps must be an integer, got 2.5"),
            (TrainSettings, "resume", "no", "--resume must be true or false, got 'no'"),
            (TrainSettings, "preset", "huge", "--preset must be one of 125m, article, llama-3.2-1b, small, "
                                              "smollm2-135m, tiny, got 'huge'"),
            (FinetuneSettings, "grad_accum", 0, "--grad-accum must be at least 1, got 0"),
            (FinetuneSettings, "epochs", -1.0, "--epochs must be above 0, got -1.0"),
            (FinetuneSettings, "betas", (0.9, 1.5), "--betas must be in [0, 1), got (0.9, 1.5)"),
            (FinetuneSettings, "betas", (0.9,), "--betas must be a list of 2 a number values, got (0.9,)")]:
        with pytest.raises(ValueError) as error:
            settings(**{"dataset": ["rows.jsonl"]} if settings is FinetuneSettings else {}, **{field: value})
        assert str(error.value) == message
    assert TrainSettings(data=Path("shards"), out=Path("run")).out == "run"  # paths are fine where strings go


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_when_it_loads(ws):
    """Defect 8: such a checkpoint loaded, then failed in the middle of generating."""
    ws, _ = ws
    with pytest.raises(ValueError) as error:
        load_pretrained(ws / "model-bigtok")
    assert str(error.value) == (f"{ws / 'model-bigtok'}: its tokenizer has 300 tokens, more than the model's "
                                "vocab_size=100, so ids from 100 up have no embedding; put the tokenizer the model "
                                "was trained with beside it")


def test_export_refuses_what_hugging_face_llama_cannot_carry(tiny_world, tmp_path):
    """Defect 9: a model with a field or weights HF's Llama has no place for (a QK-norm) exported
    'successfully', and transformers then ignored the extra weights. Both are named, and nothing is written."""
    from llama.config import LlamaConfig as Plain
    from llama.model import RMSNorm

    @dataclasses.dataclass
    class QKNormConfig(Plain):
        qk_norm: bool = False

    tokenizer = Tokenizer.load(tiny_world / "model")
    config = QKNormConfig(**LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size).to_dict(), qk_norm=True)
    model = Llama(config)
    for block in model.layers:
        block.self_attn.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
    with pytest.raises(ValueError) as error:
        save_pretrained(model, tokenizer, tmp_path / "hf")
    assert str(error.value) == (
        "Hugging Face's Llama format has no place for config qk_norm=True, tensor layers.0.self_attn.q_norm.weight "
        "[16], tensor layers.1.self_attn.q_norm.weight [16]; the exported model would differ from this one, so "
        "nothing was written. Export it in our format (--format ours) instead")
    assert not (tmp_path / "hf").exists()
    model.config = LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)  # the extra weights alone
    with pytest.raises(ValueError, match=r"no place for tensor layers.0.self_attn.q_norm.weight \[16\], tensor "):
        save_pretrained(model, tokenizer, tmp_path / "hf")
    save_pretrained(Llama(model.config), tokenizer, tmp_path / "hf")  # a plain Llama exports
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_plot_writes_over_a_plot_it_drew_and_nothing_else(ws, capsys):
    """Issue 17: --out replaced whatever it named (a run's `latest`, a device, a FIFO) when the name had no known
    image suffix. Each image it draws carries its mark (a PNG's tEXt Software entry, a PDF's or SVG's Creator),
    and it writes over a regular file carrying that mark, never over another one, nor through a link."""
    ws, _ = ws
    folder = ws / "out-plot-marks"
    folder.mkdir()
    for name, magic in (("loss.png", b"\x89PNG"), ("loss.svg", b"<?xml"), ("loss.pdf", b"%PDF"), ("loss", b"\x89PNG")):
        for _ in range(2):  # drawn, then drawn over
            assert plot_cli.main([str(ws / "run"), "--out", str(folder / name)]) == 0
        assert (folder / name).read_bytes().startswith(magic)
    (folder / "link.png").symlink_to("loss.png")
    (folder / "plain.png").write_bytes((folder / "loss.png").read_bytes().replace(b"llama.plot", b"someone!!!"))
    before = snapshot(folder, None)
    for name in ("link.png", "plain.png"):
        capsys.readouterr()
        assert plot_cli.main([str(ws / "run"), "--out", str(folder / name)]) == 2
        assert capsys.readouterr().err == (f"error: {folder / name} exists and is not a plot that llama.plot drew, so "
                                           "it is left as it is; name a new file for --out\n")
    assert snapshot(folder, None) == before and (folder / "link.png").is_symlink()
    # the library's callers own their paths (the experiments' docs/img, drawn before the mark): any image of the
    # kind is written over, still nothing else
    plot_cli.plot_runs([ws / "run"], folder / "plain.png")
    assert plot_cli.is_our_plot(folder / "plain.png", "png")
    for name in ("link.png", "../run/latest"):
        with pytest.raises(ValueError) as error:
            plot_cli.plot_runs([ws / "run"], folder / name)
        assert str(error.value) == (f"{folder / name} exists and is not a .png image, so it is left as it is; name a "
                                    "new file for --out")
    shutil.rmtree(folder)
