"""The Llama article's "previous article": pretrain our own model from scratch, BPE tokenizer included.

    python3 experiments/pretraining.py --size cpu   # 4 Wikipedia files + TinyStories, 240 steps: about 15 min
    python3 experiments/pretraining.py --size gpu   # all 50 Wikipedia files + TinyStories, 2,000 steps
    python3 experiments/pretraining.py --size gpu --prepare-only --out DIR   # the token shards alone, to carry
    python3 experiments/pretraining.py --size gpu --prepared DIR             # ... and train on them elsewhere

The article pretrained its 179M-parameter Llama on about 10 billion tokens with a 50K BPE (special
tokens [BOT] and [EOT]), and warned that results from so small a model and dataset "will likely be
poor". Here the corpus is the Wikipedia sample (enwiki_wikiextractor_sample, <doc> blocks split as
data/prepare.py's --doc-sep wikiextractor does) plus the TinyStories sample (stories split at
<|endoftext|>, the last, cut-off one dropped), one document per line of a JSONL file. data/prepare.py
trains an 8K byte-level BPE on it and writes token shards; train.py trains the `small` preset. The
result: the loss curve, validation perplexity, and the continuation of "Once upon a time, there was"
with the article's generate() defaults (temperature 0.9, top-k 50, repetition penalty 1.1 over the last
10 tokens). Goal: validation perplexity at least 20x below the untrained model's (about the
vocabulary size). experiments/instruction_sft.py fine-tunes the resulting model.

Preparing needs `datasets` and the shared data; training on the prepared shards needs neither, so a GPU
machine without them trains on a folder that --prepare-only wrote here (benchmarks/gpu_suite.sh).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import common
from llama import generate, load_pretrained
from llama.cli import train
from llama.data import prepare, split_text
from llama.plot import read_metrics

PROMPT = "Once upon a time, there was"
ARTICLE_SAMPLING = dict(max_tokens=100, temperature=0.9, top_k=50, repetition_penalty=1.1, repetition_penalty_range=10)
GOAL_FACTOR = 20
SETTINGS = {
    # wiki_shards: how many of the 50 Wikipedia files (AA/wiki_NN; None: all); steps of batch_size x seq_len tokens
    "cpu": dict(wiki_shards=4, vocab_size=8192, preset="small", batch_size=8, seq_len=256, steps=240, warmup=24,
                eval_every=40, eval_tokens=16384, compile=False),
    "gpu": dict(wiki_shards=None, vocab_size=8192, preset="small", batch_size=32, seq_len=512, steps=2000,
                warmup=100, eval_every=200, eval_tokens=262144, compile=True),
    "smoke": dict(wiki_shards=1, vocab_size=300, preset="tiny", batch_size=2, seq_len=32, steps=3, warmup=1,
                  eval_every=0, eval_tokens=64, compile=False),
}


DESCRIPTION = "corpus.txt"  # beside the prepared shards: the line that counts the corpus's documents


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the corpus's token shards to OUT/data and stop, for --prepared on a machine "
                             "without `datasets` or the shared data")
    parser.add_argument("--prepared", type=Path, default=None,
                        help="a folder that --prepare-only wrote: train on its token shards instead of preparing "
                             "the corpus (then --data-dir is not read)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return common.parse_args("pretraining", __doc__, argv, add_flags)


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_experiment(experiment, parse_args, argv)


def corpus(args: argparse.Namespace, wiki_shards: int | None) -> tuple[list[str], str]:
    """The Wikipedia articles, then the TinyStories stories, one document each; and a line that counts them."""
    folder = common.data_folder(args, "enwiki_wikiextractor_sample") / "AA"
    wiki = sorted(folder.glob("wiki_*"))[:wiki_shards]
    if not wiki:
        raise common.ExperimentError(f"no wiki_* files in {folder}; see its PROVENANCE.md, or python3 "
                                     "data/download.py enwiki_wikiextractor_sample --out DIR for a fresh copy")
    stories = common.data_file(args, "tinystories_sample", "tinystories_sample.txt")
    articles = [doc for file in wiki for doc in split_text(file.read_text(encoding="utf-8"), "wikiextractor")]
    tales = split_text(stories.read_text(encoding="utf-8"), "<|endoftext|>")[:-1]  # the last one is cut off
    return articles + tales, (f"{len(articles):,} Wikipedia articles ({len(wiki)} file{'s' * (len(wiki) > 1)}) "
                              f"+ {len(tales):,} TinyStories stories")


def prepare_data(args: argparse.Namespace, s: dict[str, Any], out: Path) -> tuple[Path, str]:
    """The corpus file and its token shards under `out` (reused when up to date); the shards' folder and a
    line that describes the corpus, which is also written beside the shards."""
    out.mkdir(parents=True, exist_ok=True)
    corpus_file = out / "corpus.jsonl"
    documents, description = corpus(args, s["wiki_shards"])
    text = "".join(json.dumps({"text": doc}) + "\n" for doc in documents)
    if not corpus_file.is_file() or corpus_file.read_text() != text:  # rewriting would make prepare.py redo it
        corpus_file.write_text(text)
    print(f"\n== prepare: {corpus_file} -> {out / 'data'}", file=sys.stderr, flush=True)
    (out / "data" / DESCRIPTION).unlink(missing_ok=True)  # ours: prepare refuses a folder holding files it did not write
    prepare(str(corpus_file), out / "data", vocab_size=s["vocab_size"], seed=common.SEED, progress=True)
    (out / "data" / DESCRIPTION).write_text(description + "\n")
    return out / "data", description


def prepared_data(folder: Path) -> tuple[Path, str]:
    """The shards' folder and the corpus's description from a folder that --prepare-only wrote."""
    data = folder / "data"
    if not (data / DESCRIPTION).is_file() or not (data / "meta.json").is_file():
        raise common.ExperimentError(f"--prepared {folder} holds no prepared corpus (data/meta.json and data/"
                                     f"{DESCRIPTION}); write one with experiments/pretraining.py --prepare-only")
    return data, (data / DESCRIPTION).read_text().strip()


def pretrain(args: argparse.Namespace, s: dict[str, Any], out: Path) -> tuple[Path, Path, str]:
    """Corpus file, token shards (or the --prepared ones) and a trained run folder under `out` (finished
    steps are reused); the run folder, the shards' folder and a line that describes the corpus."""
    prepared = getattr(args, "prepared", None)
    data, description = prepared_data(prepared) if prepared else prepare_data(args, s, out)
    run = out / "run"
    common.run_step("train", train.run, train.TrainSettings(
        data=str(data), preset=s["preset"], batch_size=s["batch_size"], seq_len=s["seq_len"],
        max_steps=s["steps"], warmup_steps=s["warmup"], lr=1e-3, min_lr=1e-4, eval_every=s["eval_every"],
        eval_tokens=s["eval_tokens"], save_every=0, keep_last=1, sample_prompt=PROMPT, seed=common.SEED,
        out=str(run), resume=True, compile=s["compile"]))
    return run, data, description


def experiment(args: argparse.Namespace) -> str | None:
    s = common.settings(args, SETTINGS)
    if args.prepare_only:
        data, description = prepare_data(args, s, args.out)
        print(f"prepared {description} in {data}; train on it with --prepared {args.out}", file=sys.stderr)
        return None
    run, data, description = pretrain(args, s, args.out)
    model, tokenizer = load_pretrained(run, device=common.device())
    sample = generate(model.eval(), tokenizer, PROMPT, seed=common.SEED, **ARTICLE_SAMPLING)
    meta = json.loads((data / "meta.json").read_text())
    train_records, records = read_metrics(run)
    first, last = records[0], records[-1]
    factor = first["val_ppl"] / last["val_ppl"]
    tokens_per_s = sorted(r["tokens_per_s"] for r in train_records)[len(train_records) // 2]  # steady, not compiling
    table = common.markdown_table(
        ["", "article (the \"previous article\")", "ours"],
        [["model", "179M parameters, 50K BPE", f"`{s['preset']}` preset, {model.num_params() / 1e6:.1f}M parameters, "
                                               f"{tokenizer.vocab_size:,}-token BPE"],
         ["corpus", "about 10B tokens", f"{meta['splits']['train']['tokens']:,} train / "
                                        f"{meta['splits']['val']['tokens']:,} validation tokens: {description}"],
         ["trained", "", f"{last['step']:,} steps, {train_records[-1]['tokens_seen']:,} tokens, "
                         f"{tokens_per_s:,.0f} tokens/s (median step)"],
         ["validation loss (perplexity), untrained", "", f"{first['val_loss']:.3f} ({first['val_ppl']:,.0f})"],
         ["validation loss (perplexity), trained", "\"will likely be poor\"",
          f"**{last['val_loss']:.3f} ({last['val_ppl']:,.1f})**"],
         [f"goal: perplexity at least {GOAL_FACTOR}x below the untrained model's", "",
          f"{factor:,.0f}x: {common.goal(factor >= GOAL_FACTOR)}"],
         [f"\"{PROMPT}\" (temperature 0.9, top-k 50, repetition penalty 1.1 over 10 tokens, seed {common.SEED})", "",
          common.said(sample)]])
    plot = common.plot_loss(args, [run], f"pretraining the {s['preset']} preset ({args.size})")
    return f"{table}\n\n{plot}\n"


if __name__ == "__main__":
    sys.exit(main())
