"""Article A, chat fine-tuning: multi-turn conversations where only the assistant's turns are trained.

    python3 experiments/chat_sft.py --size cpu   # 1 epoch, conversations cut at 384 tokens: about 10 min on 2 cores
    python3 experiments/chat_sft.py --size gpu   # 2 epochs, up to 1,024 tokens

The article fine-tuned on UltraChat (207,865 conversations, its "<|role|>" template, an EOT after every
message) and chatted with the result in a loop that appends the assistant's cue and generates until
EOT. UltraChat is not in the shared data; its place is taken by the 188 English oasst1 conversations
(oasst1_en_validation, each the top-ranked thread of a message tree), 10% held out with a fixed seed.
SmolLM2-135M-Instruct is fine-tuned by finetune.py in its own chat template (ChatML), where only the
assistant turns and their <|im_end|> count in the loss. Measured: the masked validation loss before
and after (goal: it falls), and a three-turn conversation driven through generate.py's chat REPL
(--chat, fed by piped stdin) with the model before and after, greedy with repetition penalty 1.1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import common
from llama.cli import finetune
from llama.cli import generate as chat_cli
from llama.rows import split_rows

USER_TURNS = ("What are three tips for staying focused while studying?",
              "Which of those helps most if my phone keeps distracting me?",
              "Thanks! Can you say that again in one sentence?")
ARTICLE_CONVERSATIONS = 207865
VAL_FRACTION = 0.1
SETTINGS = {
    "cpu": dict(epochs=1, evaluations=2, batch_size=4, max_len=384, answer_tokens=96),
    "gpu": dict(epochs=2, batch_size=4, max_len=1024, answer_tokens=200),
    "smoke": dict(max_steps=2, evaluations=1, batch_size=2, max_len=96, answer_tokens=8),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return common.parse_args("chat_sft", __doc__, argv,
                             lambda p: common.add_model_flag(p, "model to fine-tune, with a chat template"))


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_experiment(experiment, parse_args, argv)


def chat_transcript(model: str | Path, answer_tokens: int) -> list[str]:
    """The model's answers to USER_TURNS, one conversation through `generate.py --chat` with piped stdin."""
    command = [sys.executable, str(common.REPO / "generate.py"), "--model", str(model), "--chat", "--template",
               "model", "--temperature", "0", "--repetition-penalty", "1.1", "--max-tokens", str(answer_tokens)]
    print(f"\n$ {' '.join(command)}", file=sys.stderr, flush=True)
    result = subprocess.run(command, input="\n".join(USER_TURNS) + "\nquit\n", capture_output=True, text=True,
                            cwd=common.REPO)
    if result.returncode != 0:
        raise common.ExperimentError(f"generate.py --chat failed with exit code {result.returncode}: "
                                     f"{result.stderr.strip()}")
    # stdout: the banner, then "> " (the REPL's prompt) and an answer per turn, then "> " before "quit"
    body = result.stdout.removeprefix(chat_cli.BANNER + "\n").removesuffix("> ")
    answers = body.removeprefix("> ").removesuffix("\n").split("\n> ")
    if len(answers) != len(USER_TURNS):  # an answer that itself holds a line starting with "> "
        raise common.ExperimentError(f"cannot split the chat transcript into {len(USER_TURNS)} answers:\n"
                                     f"{result.stdout}")
    return answers


def experiment(args: argparse.Namespace) -> str:
    s = common.settings(args, SETTINGS)
    threads = common.data_file(args, "oasst1_en_validation", "oasst1_validation_en_top1_threads.jsonl")
    rows = [json.loads(line) for line in threads.read_text().splitlines() if line.strip()]
    # as finetune.py holds them out
    val_rows = [rows[i] for i in split_rows(len(rows), VAL_FRACTION, common.SEED)[1]]
    model = args.model or common.smollm2_path()
    before = chat_transcript(model, s["answer_tokens"])
    run = args.out / "smollm2"
    common.run_step("finetune", finetune.run, finetune.FinetuneSettings(
        model=model, dataset=threads, format="chat", template="model", val_fraction=VAL_FRACTION, seed=common.SEED,
        max_len=s["max_len"], batch_size=s["batch_size"], lr=1e-4,
        **common.finetune_length(s, len(rows) - len(val_rows)), save_every=0, keep_last=1,
        sample_prompt=USER_TURNS[0], out=run, resume=True))
    after = chat_transcript(run, s["answer_tokens"])

    records = common.evaluations(run)
    first, last = records[0], records[-1]
    table = common.markdown_table(
        ["", "article: its Llama on UltraChat", "ours: SmolLM2-135M-Instruct on oasst1 top-1 threads"],
        [["conversations: train / held out", f"{ARTICLE_CONVERSATIONS:,}",
          f"{len(rows) - len(val_rows):,} / {len(val_rows):,}, {common.describe_length(s)}, cut at "
          f"{s['max_len']} tokens, lr 1e-4"],
         ["template, trained tokens", "<|role|> per message, EOT after each",
          "SmolLM2's ChatML; assistant turns and their <|im_end|> only"],
         ["masked validation loss, before -> after", "", f"{first['val_loss']:.3f} -> **{last['val_loss']:.3f}**"],
         ["goal: the masked validation loss falls", "", common.goal(last["val_loss"] < first["val_loss"])]])
    transcript = common.markdown_table(["user", "SmolLM2 before", "after chat SFT"],
                                       [[turn, common.said(base), common.said(tuned)]
                                        for turn, base, tuned in zip(USER_TURNS, before, after)])
    plot = common.plot_loss(args, [run], f"chat SFT of SmolLM2-135M on oasst1 ({args.size})")
    return (f"{table}\n\nOne conversation through the chat REPL, `generate.py --model MODEL --chat --template model "
            f"--temperature 0 --repetition-penalty 1.1 --max-tokens {s['answer_tokens']}` with the three user "
            f"lines piped to its stdin:\n\n{transcript}\n\n{plot}\n")


if __name__ == "__main__":
    sys.exit(main())
