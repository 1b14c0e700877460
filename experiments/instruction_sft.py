"""Article A, instruction fine-tuning on Alpaca: after SFT, does a model answer, and stop?

    python3 experiments/instruction_sft.py --size cpu   # about 30 min on 2 CPU cores, 17 more if it must pretrain
    python3 experiments/instruction_sft.py --size gpu   # all of Alpaca, 2 epochs as in the article, for our model

The article fine-tuned its own pretrained Llama on the 52,002 Alpaca rows (Alpaca template, 2 epochs,
lr 1e-4, batch 4), but its loss ignored pad = EOT, so its model never learned to stop. It also showed
what instruction tuning is for: given "Find the verb in the following sentence." with the input "John
and Mary walk across the street to the bookstore.", the base Llama-3.2-1B rambles and the instruct
model answers `The verb in the sentence is "walk."`.

Two models go through finetune.py with the Alpaca template (the answer and the EOT after it count):
  ours     our `small` model pretrained from scratch by experiments/pretraining.py (--pretrained; when
           that run is missing it is pretrained first, with the same --size);
  smollm2  SmolLM2-135M-Instruct (--model).
Each is measured before and after SFT: the masked validation loss on held-out rows (finetune.py's
evaluations at step 0 and at the end), the share of greedy answers to held-out instructions that end
with EOT within 256 tokens (goal: at least 95% after SFT), and the answer to the article's verb prompt.
Every held-out answer is saved in OUT/PART_answers.jsonl; the run folders are OUT/ours and OUT/smollm2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments import common, pretraining
from llama import Llama, Tokenizer, load_pretrained
from llama.cli import finetune
from llama.generation import encode_prompt, fit_context, generate_tokens
from llama.rows import sample_rows, split_rows
from llama.templates import alpaca_prompt

VERB = ("Find the verb in the following sentence.", "John and Mary walk across the street to the bookstore.")
GOAL_STOPS = 0.95
ARTICLE_ROWS = 52002
SETTINGS = {
    # per part: rows, a seeded subset of Alpaca (None: all), val_fraction of them held out; held_out of those
    # (the first whose prompt leaves room for the answer) are answered before and after
    "cpu": dict(held_out=32, answer_tokens=256, verb_tokens=64, answer_batch=16, parts={
        "ours": dict(rows=2000, val_fraction=0.05, epochs=1, evaluations=2, batch_size=8, lr=3e-4, max_len=512),
        "smollm2": dict(rows=440, val_fraction=0.1, epochs=1, evaluations=2, batch_size=4, lr=1e-4, max_len=512)}),
    "gpu": dict(held_out=200, answer_tokens=256, verb_tokens=64, answer_batch=64, parts={
        "ours": dict(rows=None, val_fraction=0.01, epochs=2, batch_size=16, lr=3e-4, max_len=512),
        "smollm2": dict(rows=10000, val_fraction=0.02, epochs=1, batch_size=8, lr=1e-4, max_len=1024)}),
    "smoke": dict(held_out=3, answer_tokens=16, verb_tokens=8, answer_batch=2, parts={
        "ours": dict(rows=24, val_fraction=0.25, max_steps=2, evaluations=1, batch_size=4, lr=1e-3, max_len=200),
        "smollm2": dict(rows=24, val_fraction=0.25, max_steps=2, evaluations=1, batch_size=4, lr=1e-3,
                        max_len=200)}),
}


PARTS = ("ours", "smollm2")
TITLES = {"ours": "ours, pretrained from scratch", "smollm2": "SmolLM2-135M-Instruct"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_parts_flag(parser, PARTS, "ours, smollm2")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="our pretrained model to fine-tune (default: the run of experiments/pretraining.py "
                             "with the same --size, runs/experiments/pretraining-SIZE/run, pretrained first when "
                             "missing)")
    common.add_model_flag(parser, "the pretrained model of the second part")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return common.parse_args("instruction_sft", __doc__, argv, add_flags)


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_experiment(experiment, parse_args, argv)


@torch.no_grad()
def greedy_answers(model: Llama, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], max_tokens: int,
                   batch_size: int) -> list[tuple[str, bool]]:
    """(answer, whether it ended with EOT within max_tokens) for each prompt, decoding greedily."""
    model.eval()
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        answers, stopped = [[] for _ in chunk], [False] * len(chunk)
        for tokens in generate_tokens(model, chunk, max_tokens=max_tokens, temperature=0,
                                      stop_ids=tokenizer.stop_ids):
            for row, token in enumerate(tokens.tolist()):
                if not stopped[row]:
                    stopped[row] = token == tokenizer.eot_id
                    answers[row] += [] if stopped[row] else [token]
        results += [(tokenizer.decode(answer), done) for answer, done in zip(answers, stopped)]
    return results


def measure(model_path: str | Path, rows: Sequence[dict[str, str]], count: int, max_tokens: int,
            verb_tokens: int, batch_size: int) -> dict[str, Any]:
    """Greedy answers to the first `count` rows whose prompt leaves room for max_tokens, the share of them
    that stop, and the answer to the verb prompt."""
    model, tokenizer = load_pretrained(model_path, device=common.device())
    prompts = [encode_prompt(tokenizer, alpaca_prompt(row["instruction"], row["input"])) for row in rows]
    fitting = [i for i, ids in enumerate(prompts) if len(ids) + max_tokens <= model.config.max_seq_len][:count]
    answers = greedy_answers(model, tokenizer, [prompts[i] for i in fitting], max_tokens, batch_size)
    verb_prompt, verb_tokens = fit_context(encode_prompt(tokenizer, alpaca_prompt(*VERB)), verb_tokens,
                                           model.config.max_seq_len)
    [(verb, _)] = greedy_answers(model, tokenizer, [verb_prompt], verb_tokens, 1)
    return {"rows": fitting, "answers": answers, "verb": verb,
            "stop_share": sum(stopped for _, stopped in answers) / max(len(answers), 1)}


def alpaca_rows(args: argparse.Namespace) -> list[dict[str, str]]:
    """The 52,002 Alpaca rows: upstream's alpaca_data.json, as data/download.py writes it, or the 18 parts
    of ../shared/data/alpaca, in order."""
    folder = common.data_folder(args, "alpaca")
    files = [folder / "alpaca_data.json"] if (folder / "alpaca_data.json").is_file() else sorted(
        folder.glob("alpaca_data_part*.json"))
    if not files:
        raise common.ExperimentError(f"neither alpaca_data.json nor alpaca_data_part*.json files in {folder}; "
                                     "python3 data/download.py alpaca --out DIR writes a fresh copy")
    return [row for file in files for row in json.loads(file.read_text(encoding="utf-8"))]


def sft(args: argparse.Namespace, part: str, model: str | Path, rows: list[dict[str, str]], s: dict[str, Any],
        answering: dict[str, int]) -> dict[str, Any]:
    """One model before and after Alpaca SFT on a seeded subset of the rows; its run folder is OUT/PART."""
    rows = sample_rows(rows, s["rows"], common.SEED)
    rows_file = args.out / f"{part}_alpaca_rows.json"
    rows_file.write_text(json.dumps(rows))
    # the rows finetune.py holds out
    val_rows = [rows[i] for i in split_rows(len(rows), s["val_fraction"], common.SEED)[1]]
    before = measure(model, val_rows, **answering)
    run = args.out / part
    common.run_step("finetune", finetune.run, finetune.FinetuneSettings(
        model=model, dataset=rows_file, template="alpaca", val_fraction=s["val_fraction"], seed=common.SEED,
        max_len=s["max_len"], batch_size=s["batch_size"], lr=s["lr"],
        **common.finetune_length(s, len(rows) - len(val_rows)), save_every=0, keep_last=1,
        sample_prompt=f"{VERB[0]} {VERB[1]}", out=run, resume=True))
    after = measure(run, val_rows, **answering)  # the same prompts: SFT changes neither tokens nor context
    with open(args.out / f"{part}_answers.jsonl", "w") as answers:
        for i, (base, stopped_base), (tuned, stopped_tuned) in zip(before["rows"], before["answers"], after["answers"]):
            answers.write(json.dumps({**val_rows[i], "before": base, "stopped_before": stopped_base,
                                      "after": tuned, "stopped_after": stopped_tuned}) + "\n")
    records = common.evaluations(run)
    return {"before": before, "after": after, "first": records[0], "last": records[-1],
            "held_out": len(before["rows"]), "train": len(rows) - len(val_rows), "val": len(val_rows), "run": run,
            "settings": s}


def our_pretrained_model(args: argparse.Namespace) -> Path:
    """--pretrained, or experiments/pretraining.py's run of this size, pretrained first when it is missing."""
    if args.pretrained is not None:
        if not args.pretrained.exists():
            raise common.ExperimentError(f"--pretrained {args.pretrained} not found: run experiments/pretraining.py "
                                         "first, or leave out --pretrained")
        return args.pretrained
    folder = (args.out / "pretraining" if args.smoke
              else common.REPO / "runs" / "experiments" / f"pretraining-{args.size}")
    if not (folder / "run" / "latest").is_file():
        print(f"no pretrained model in {folder / 'run'}: pretraining it first (experiments/pretraining.py)",
              file=sys.stderr)
        pretraining.pretrain(args, common.settings(args, pretraining.SETTINGS), folder)
    return folder / "run"


def experiment(args: argparse.Namespace) -> str:
    s = common.settings(args, SETTINGS)
    chosen = common.choose_parts(args, PARTS)
    rows = alpaca_rows(args)
    models = {part: our_pretrained_model(args) if part == "ours" else args.model or common.smollm2_path()
              for part in chosen}
    answering = dict(count=s["held_out"], max_tokens=s["answer_tokens"], verb_tokens=s["verb_tokens"],
                     batch_size=s["answer_batch"])
    parts = {part: sft(args, part, models[part], rows, s["parts"][part], answering) for part in models}

    def both(describe) -> list[str]:
        return [describe(parts[part]) for part in models]

    def stops(p: dict[str, Any]) -> str:
        return (f"{100 * p['before']['stop_share']:.0f}% -> **{100 * p['after']['stop_share']:.0f}%** "
                f"of {p['held_out']}")

    table = common.markdown_table(
        ["", "article: its own Llama (Llama-3.2-1B for the verb)", *(TITLES[part] for part in models)],
        [["SFT rows: train / held out", f"{ARTICLE_ROWS:,}, 2 epochs, batch 4, lr 1e-4",
          *both(lambda p: f"{p['train']:,} / {p['val']:,}, {common.describe_length(p['settings'])}, "
                          f"batch {p['settings']['batch_size']}, lr {p['settings']['lr']:g}")],
         ["masked validation loss, before -> after", "",
          *both(lambda p: f"{p['first']['val_loss']:.3f} -> **{p['last']['val_loss']:.3f}**")],
         [f"greedy answers to held-out instructions that end with EOT within {s['answer_tokens']} tokens, "
          "before -> after", "never (its loss ignored pad = EOT)", *both(stops)],
         [f"goal: at least {100 * GOAL_STOPS:.0f}% stop after SFT", "",
          *both(lambda p: common.goal(p["after"]["stop_share"] >= GOAL_STOPS))],
         [f"\"{VERB[0]}\" / \"{VERB[1]}\" before SFT", "base model: rambles",
          *both(lambda p: common.said(p["before"]["verb"]))],
         ["... after SFT", "instruct model: The verb in the sentence is \"walk.\"",
          *both(lambda p: common.said(p["after"]["verb"]))]])
    plot = common.plot_loss(args, [parts[part]["run"] for part in models], f"Alpaca SFT ({args.size})")
    return f"{table}\n\nGreedy answers; the verb answer is cut at {s['verb_tokens']} tokens.\n\n{plot}\n"


if __name__ == "__main__":
    sys.exit(main())
