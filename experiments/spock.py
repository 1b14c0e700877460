"""Article B, "How to fine-tune a causal language model": make a model speak like Spock.

    python3 experiments/spock.py --size cpu     # 1,600 lines, 1 epoch: about 15 min on 2 CPU cores
    python3 experiments/spock.py --size gpu     # all 4,580 lines, the article's 3 epochs

The article fine-tuned DistilGPT2 on Spock's lines from the Star Trek TOS scripts (3,476 train / 869
validation): perplexity about 253 before and 47 after (5.4x lower). Here SmolLM2-135M-Instruct is
fine-tuned on Spock's lines (star_trek_tos_transcripts/spock_lines_derived.jsonl), split 80/20 with a
fixed seed, by finetune.py with the article's objective: each line is its own example, plain text
without special tokens (GPT-2 adds none), and every token after the first counts
(--template '{text}' --no-special-tokens).

Perplexity is measured the article's way, before and after, on the held-out lines: each line alone,
exp of the token-weighted mean negative log-likelihood of every token after the first. Goal: it ends
at or below the article's 47 (a goal on the drop would measure the starting model more than the
fine-tuning: SmolLM2 starts near 147 where DistilGPT2 started at 253). finetune.py's validation loss is the same measure, computed by other code: the table
shows both. The three prompts of the article are continued by both models, as the article's
text-generation pipeline did (greedy, repetition penalty 1.1), side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments import common
from llama import Llama, Tokenizer, load_pretrained, stream
from llama.batch import collate
from llama.cli import finetune
from llama.rows import sample_rows, split_rows, write_jsonl

PROMPTS = ("What is the meaning of life?", "Where did that planet go?", "What's the best way to cook a turkey?")
ARTICLE = {"before": 253, "after": 47, "train": 3476, "val": 869}
GOAL_PERPLEXITY = ARTICLE["after"]  # the article's end point
VAL_FRACTION = 0.2
MAX_LEN = 256  # positions per example, and per packed row
SETTINGS = {
    # lines: a seeded subset of the 4,580 (None: all); the article trained 3 epochs with HF Trainer's batch 8.
    # pack: rows of MAX_LEN positions, each holding several lines that attend only to themselves (the same
    # loss as one line per row). On 2 CPU cores a step of SmolLM2 spends about 1 s on gradient clipping
    # and AdamW whatever its size, so 2 packed rows of 256 (about 30 lines, no padding) trained 1.5x more
    # positions a second than 8 padded lines; the fewer, larger steps take a larger learning rate
    "cpu": dict(lines=1600, epochs=1, evaluations=2, batch_size=2, pack=True, lr="2e-4", answer_tokens=48),
    "gpu": dict(lines=None, epochs=3, batch_size=8, lr="1e-4", answer_tokens=48),
    "smoke": dict(lines=40, max_steps=2, evaluations=1, batch_size=4, lr="1e-4", answer_tokens=8),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return common.parse_args("spock", __doc__, argv, common.add_model_flag)


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_experiment(experiment, parse_args, argv)


@torch.no_grad()
def line_perplexity(model: Llama, tokenizer: Tokenizer, lines: Sequence[str], batch_size: int = 32) -> float:
    """exp(mean NLL) over every token after the first of each line, each line alone and without special
    tokens: the article's measurement, where GPT-2 adds no BOS and the labels are the inputs shifted by one."""
    model.eval()
    encoded = sorted((ids for ids in tokenizer.encode_batch(list(lines)) if len(ids) > 1), key=len)
    total, counted = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate([{"input_ids": torch.tensor(ids[:-1]), "targets": torch.tensor(ids[1:]),
                          "loss_mask": torch.ones(len(ids) - 1, dtype=torch.bool)}
                         for ids in encoded[start:start + batch_size]]).to(model.embed_tokens.weight.device)
        total += float(model.loss(batch.input_ids, batch.targets, batch.loss_mask, reduction="sum"))
        counted += batch.num_counted
    return math.exp(total / counted)


def measure(model_path: str | Path, lines: Sequence[str], answer_tokens: int) -> tuple[float, list[str]]:
    """(per-line perplexity on `lines`, greedy replies to the article's prompts) of one model."""
    model, tokenizer = load_pretrained(model_path, device=common.device())
    answers = ["".join(stream(model.eval(), tokenizer, tokenizer.encode(prompt), max_tokens=answer_tokens,
                              temperature=0, repetition_penalty=1.1)) for prompt in PROMPTS]
    return line_perplexity(model, tokenizer, lines), answers


def experiment(args: argparse.Namespace) -> str:
    s = common.settings(args, SETTINGS)
    source = common.data_file(args, "star_trek_tos_transcripts", "spock_lines_derived.jsonl")
    rows = [{"text": json.loads(line)["text"]} for line in source.read_text().splitlines() if line.strip()]
    rows = sample_rows(rows, s["lines"], common.SEED)
    lines_file = write_jsonl(args.out / "spock_lines.jsonl", rows)
    val_rows = [rows[i] for i in split_rows(len(rows), VAL_FRACTION, common.SEED)[1]]  # as finetune holds them out
    held_out = [row["text"] for row in val_rows]
    model = args.model or common.smollm2_path()

    before, base_answers = measure(model, held_out, s["answer_tokens"])
    run = args.out / "smollm2"
    common.run_step("finetune", finetune.run, finetune.FinetuneSettings(
        model=model, dataset=lines_file, template="{text}", output_field="text", no_special_tokens=True,
        val_fraction=VAL_FRACTION, seed=common.SEED, max_len=MAX_LEN, pack=s.get("pack", False),
        batch_size=s["batch_size"], lr=float(s["lr"]), **common.finetune_length(s, len(rows) - len(val_rows)),
        save_every=0, keep_last=1, sample_prompt=PROMPTS[0], out=run, resume=True))
    after, tuned_answers = measure(run, held_out, s["answer_tokens"])

    drop = before / after
    records = common.evaluations(run)
    first, last = records[0], records[-1]
    results = common.markdown_table(
        ["", "article: DistilGPT2", "ours: SmolLM2-135M-Instruct"],
        [["train / held-out lines", f"{ARTICLE['train']:,} / {ARTICLE['val']:,}, 3 epochs",
          f"{len(rows) - len(val_rows):,} / {len(val_rows):,}, {common.describe_length(s)}, batch "
          + (f"{s['batch_size']} packed rows of {MAX_LEN} positions" if s.get("pack") else f"{s['batch_size']}")
          + f", lr {s['lr']}"],
         ["per-line perplexity before fine-tuning", ARTICLE["before"], f"{before:.1f}"],
         ["per-line perplexity after", ARTICLE["after"], f"{after:.1f}"],
         ["drop", f"{ARTICLE['before'] / ARTICLE['after']:.1f}x", f"**{drop:.1f}x**"],
         [f"goal: perplexity after fine-tuning at most {GOAL_PERPLEXITY}, the article's", "",
          common.goal(after <= GOAL_PERPLEXITY)],
         ["the same measure by finetune.py's validation: loss (perplexity)", "",
          f"{first['val_loss']:.3f} ({math.exp(first['val_loss']):.1f}) -> {last['val_loss']:.3f} "
          f"({math.exp(last['val_loss']):.1f})"]])
    answers = common.markdown_table(["prompt", "SmolLM2 before", "after fine-tuning on Spock's lines"],
                                    [[prompt, common.said(base), common.said(tuned)]
                                     for prompt, base, tuned in zip(PROMPTS, base_answers, tuned_answers)])
    plot = common.plot_loss(args, [run], f"SmolLM2-135M on Spock's lines ({args.size})")
    return (f"{results}\n\nThe article's three prompts and their greedy continuations (up to {s['answer_tokens']} "
            f"tokens, repetition penalty 1.1):\n\n{answers}\n\n{plot}\n")


if __name__ == "__main__":
    sys.exit(main())
