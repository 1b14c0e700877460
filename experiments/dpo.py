"""Raschka's "LLMs from scratch", chapter 7 bonus: preference tuning with DPO, polite answers over rude ones.

    python3 experiments/dpo.py --size cpu   # 240 of the 935 pairs, LoRA, 1 epoch (30 steps): 20 min on 2 CPU cores
    python3 experiments/dpo.py --size gpu   # all 935 pairs as the book, full weights, then HH-RLHF harmless pairs

The book's notebook (dpo-from-scratch.ipynb) fine-tunes its instruction-tuned GPT-2 medium (355M) with DPO
on instruction-data-with-preference.json: 1,100 Alpaca rows, each with a polite `chosen` and an impolite or
rude `rejected` answer, split in order 85/5/10 into 935 training, 55 validation and 110 test pairs; beta
0.1, lr 5e-6, batch 8, one epoch. Its validation reward margin rose from 0.006 to 1.576 (the validation
DPO loss from 0.693 to 0.625), and the answers turned polite.

Here SmolLM2-135M-Instruct takes the book's place, already instruction-tuned (so no SFT first), with its
own chat template, and finetune.py --task dpo trains it on the same split and beta, validating on the 55
pairs. Before and after: the validation reward margin and accuracy (from the run's metrics), the held-out
test pairs' reward accuracy and margin (the trained model against the reference, scored here), and greedy
answers to five test instructions. The CPU size trains rank-16 LoRA adapters for one epoch (30 steps of 8 pairs)
from a seeded 240 of the training pairs at lr 1e-3 (LoRA's step skips the weight gradients; a learning
rate far above the book's full fine-tuning one makes 30 steps move the margin; docs/experiments.md
compares the settings tried); the GPU size trains all weights on all 935 at the book's lr 5e-6,
then does the same with Anthropic's HH-RLHF harmless-base test pairs (the prompt is the dialogue both
transcripts share, the response its last assistant turn).

Goal: a validation reward margin after DPO of at least the book's 1.58 (GPT-2 medium, same data, beta 0.1),
and a held-out test reward accuracy of at least 0.9.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import common
from llama.cli import finetune
from llama.generation import stream
from llama.hub import load_pretrained
from llama.tasks.dpo import PreferenceDataset, reference_log_probs
from llama.rows import sample_rows, write_jsonl
from llama.templates import user_prompt

BOOK = {"train": 935, "validation": 55, "test": 110, "margin_before": 0.006, "margin_after": 1.576,
        "loss_before": 0.693, "loss_after": 0.625}
GOAL_MARGIN, GOAL_ACCURACY = 1.58, 0.9
BETA = 0.1
ANSWERS = 5  # test instructions answered before and after
SETTINGS = {
    # rows: a seeded subset of the 935 training pairs (None: all); hh_rows: HH-RLHF pairs for a second run
    # (None: none; 0: all)
    "cpu": dict(rows=240, epochs=1, evaluations=3, batch_size=8, lr=1e-3, lora_rank=16, hh_rows=None,
                max_tokens=60),
    "gpu": dict(rows=None, epochs=1, evaluations=8, batch_size=8, lr=5e-6, lora_rank=0, hh_rows=0, max_tokens=120),
    "smoke": dict(rows=16, max_steps=2, evaluations=1, batch_size=4, lr=1e-3, lora_rank=4, hh_rows=12,
                  max_tokens=8, test_rows=8, validation_rows=8),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return common.parse_args("dpo", __doc__, argv, common.add_model_flag)


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_experiment(experiment, parse_args, argv)


def book_split(rows: list[dict[str, Any]]) -> tuple[list, list, list]:
    """The notebook's split, in file order: the first 85% train, the next 10% test, the last 5% validation."""
    train, test = int(len(rows) * 0.85), int(len(rows) * 0.1)
    return rows[:train], rows[train + test:], rows[train:train + test]


def test_rewards(base: str | Path, run: Path, rows: list[dict[str, Any]], template: str,
                 batch_size: int) -> dict[str, float]:
    """Reward accuracy and margin of the trained run on pairs it never saw, the base model as the reference;
    and how often the base model alone gives the chosen answer the higher log-probability."""
    device = common.device()
    model, tokenizer = load_pretrained(base, device=device)
    pairs = PreferenceDataset(rows, tokenizer, template=template, max_len=model.config.max_seq_len - 1)
    reference = reference_log_probs(model, pairs, batch_size=batch_size, desc="test pairs (reference)")
    model, _ = load_pretrained(run, device=device)
    policy = reference_log_probs(model, pairs, batch_size=batch_size, desc="test pairs (trained)")
    rewards = BETA * (policy - reference)
    margins = rewards[:, 0] - rewards[:, 1]
    return {"pairs": len(pairs), "accuracy": (margins > 0).float().mean().item(), "margin": margins.mean().item(),
            "reference_prefers_chosen": (reference[:, 0] > reference[:, 1]).float().mean().item()}


def answers(model_path: str | Path, rows: list[dict[str, Any]], template: str, max_tokens: int) -> list[str]:
    """Greedy answers to the rows' instructions (and inputs)."""
    model, tokenizer = load_pretrained(model_path, device=common.device())
    model.eval()
    said = []
    for row in rows:
        text = f"{row['instruction']}\n\n{row['input']}" if row.get("input", "").strip() else row["instruction"]
        said.append("".join(stream(model, tokenizer, user_prompt(tokenizer, text, template), max_tokens=max_tokens,
                                   temperature=0)))
    return said


def dpo_run(args: argparse.Namespace, s: dict[str, Any], model: str | Path, name: str, train: list, val: list,
            template: str) -> Path:
    """finetune.py --task dpo on the pairs; returns the run folder."""
    train_file = write_jsonl(args.out / f"{name}_train.jsonl", train)
    val_file = write_jsonl(args.out / f"{name}_validation.jsonl", val)
    run = args.out / name
    common.run_step(f"DPO on {name}", finetune.run, finetune.FinetuneSettings(
        task="dpo", model=model, dataset=train_file, val_dataset=val_file, template=template, beta=BETA,
        lr=s["lr"], batch_size=s["batch_size"], lora_rank=s["lora_rank"], max_len=512,
        **common.finetune_length(s, len(train)), sample_prompt="", save_every=0, keep_last=1, seed=common.SEED,
        out=run, resume=True))
    return run


def validation(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    records = common.evaluations(run)
    if not records:
        raise common.ExperimentError(f"{run} has no validation records; delete it and run again")
    return records[0], records[-1]


def hh_rows(args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    """HH-RLHF harmless-base test pairs that are pairs: transcripts that share all but their last assistant
    turn, and whose last turns are not empty; a seeded `count` of them (0: all)."""
    path = common.data_file(args, "hh_rlhf_harmless_base_test", "test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    usable = [row for row in rows if all(row[field].rsplit("\n\nAssistant:", 1)[-1].strip()
                                         for field in ("chosen", "rejected"))]
    return sample_rows(usable, count or None, common.SEED)


def experiment(args: argparse.Namespace) -> str:
    s = common.settings(args, SETTINGS)
    rows = json.loads(common.data_file(args, "rasbt_preference_data", "instruction-data-with-preference.json")
                      .read_text(encoding="utf-8"))
    train, val, test = book_split(rows)
    train = sample_rows(train, s["rows"], common.SEED)
    val, test = val[:s.get("validation_rows")], test[:s.get("test_rows")]
    model = args.model or common.smollm2_path()
    template = "model"
    run = dpo_run(args, s, model, "smollm2", train, val, template)
    before, after = validation(run)
    scored = test_rewards(model, run, test, template, s["batch_size"])
    shown = test[:ANSWERS]
    base_answers, dpo_answers = (answers(model, shown, template, s["max_tokens"]),
                                 answers(run, shown, template, s["max_tokens"]))

    margin, accuracy = after["val_rewards/margins"], scored["accuracy"]
    length = common.describe_length(s)
    how = (f"LoRA rank {s['lora_rank']}" if s["lora_rank"] else "all weights") + f", lr {s['lr']:g}"
    results = common.markdown_table(
        ["", "book: GPT-2 medium (355M), instruction-tuned", "ours: SmolLM2-135M-Instruct"],
        [["training pairs", f"{BOOK['train']}, 1 epoch, batch 8, all weights, lr 5e-6, beta 0.1",
          f"{len(train)}{' (a seeded subset of the 935)' if s['rows'] else ''}, {length}, batch {s['batch_size']}, "
          f"{how}, beta {BETA}"],
         [f"validation reward margin, before -> after ({len(val)} pairs)",
          f"{BOOK['margin_before']} -> {BOOK['margin_after']}",
          f"{before['val_rewards/margins']:.3f} -> **{margin:.3f}**"],
         ["validation reward accuracy, before -> after", "not reported",
          f"{before['val_rewards/accuracies']:.3f} -> {after['val_rewards/accuracies']:.3f}"],
         ["validation DPO loss, before -> after", f"{BOOK['loss_before']} -> {BOOK['loss_after']}",
          f"{before['val_loss']:.3f} -> {after['val_loss']:.3f}"],
         [f"held-out test pairs: reward accuracy / margin ({scored['pairs']} pairs)", "not reported",
          f"**{accuracy:.3f}** / {scored['margin']:.3f}"],
         ["test pairs where the untrained model already gives the chosen answer the higher log-probability", "",
          f"{scored['reference_prefers_chosen']:.3f}"],
         [f"goal: validation margin at least {GOAL_MARGIN} (the book's) and test reward accuracy at least "
          f"{GOAL_ACCURACY}", "", common.goal(margin >= GOAL_MARGIN and accuracy >= GOAL_ACCURACY)]])
    table = common.markdown_table(
        ["test instruction", "rejected answer in the data", "SmolLM2 before DPO", "after DPO"],
        [[row["instruction"] + (f" ({row['input']})" if row.get("input", "").strip() else ""), row["rejected"],
          common.said(a), common.said(b)] for row, a, b in zip(shown, base_answers, dpo_answers)])
    runs, extra = [run], ""
    if s["hh_rows"] is not None:
        hh = hh_rows(args, s["hh_rows"])
        cut = max(1, len(hh) // 10)
        hh_run = dpo_run(args, s, model, "smollm2-hh", hh[cut:], hh[:cut], template)
        hh_before, hh_after = validation(hh_run)
        runs.append(hh_run)
        extra = ("\n\nHH-RLHF harmless-base pairs (" f"{len(hh) - cut} training, {cut} validation; the set's "
                 "chosen replies are often poor, so this shows the loop on multi-turn transcripts rather than a "
                 "better assistant):\n\n" + common.markdown_table(
                     ["", "before", "after"],
                     [["validation reward margin", f"{hh_before['val_rewards/margins']:.3f}",
                       f"{hh_after['val_rewards/margins']:.3f}"],
                      ["validation reward accuracy", f"{hh_before['val_rewards/accuracies']:.3f}",
                       f"{hh_after['val_rewards/accuracies']:.3f}"]]))
    plot = common.plot_loss(args, runs, f"DPO of SmolLM2-135M ({args.size})",
                            ["val_rewards/margins", "val_rewards/accuracies"])
    return (f"{results}\n\nGreedy answers to the first {len(shown)} test instructions (never trained on), through "
            f"SmolLM2's chat template:\n\n{table}{extra}\n\nA reward is beta x (the trained model's log-probability of "
            "a response - the reference's, the untrained model's); before training every reward is 0, so the margin "
            "and accuracy start at 0 (accuracy counts a pair when its chosen reward is strictly higher, as TRL "
            f"does).\n\n{plot}\n")


if __name__ == "__main__":
    sys.exit(main())
