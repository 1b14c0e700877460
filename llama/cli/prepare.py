"""Turn a text corpus into token shards for pretraining (train.py reads them with llama.data.PretrainLoader).

    python data/prepare.py --input data/tinyshakespeare/input.txt --out runs/data/shakespeare --vocab-size 1024
    python data/prepare.py --input data/tinystories_sample/tinystories_sample.txt --doc-sep '<|endoftext|>' \
        --out runs/data/tinystories
    python data/prepare.py --input data/enwiki_wikiextractor_sample/AA --doc-sep wikiextractor \
        --out runs/data/enwiki --val-docs 100
    python data/prepare.py --input roneneldan/TinyStories --out runs/data/tinystories --tokenizer runs/smollm2

Local corpora come from `python data/download.py NAME` (into data/NAME/); a Hugging Face dataset id is
read through `datasets`.

The output folder holds train_000000.bin, ... and val_000000.bin, ... (each document as
[BOT] tokens [EOT], raw little-endian uint16, or uint32 when the vocabulary exceeds 65536),
tokenizer.json, and meta.json, written last, with token and document counts. Running again with the
same inputs and settings does nothing; --force rebuilds.
"""
from __future__ import annotations

import argparse
import sys

from ..data import DEFAULT_SHARD_TOKENS, FILE_KINDS, prepare
from ..tokenizer import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS
from .usage import ArgumentParser, UsageError, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="data/prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="a file or folder of .txt, .json, .jsonl, .csv or .parquet files (searched recursively; "
                        ".gz/.bz2/.xz compressed too; files without an extension are text), or a Hugging Face "
                        "dataset id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="auto", choices=("auto", *FILE_KINDS),
                   help="read files as this kind, whatever their extension; picks one kind in a mixed folder "
                        "(default: auto, from the extensions)")
    p.add_argument("--text-field", default="text",
                   help="the field holding the text, in json, csv, parquet and Hub data (default: text)")
    p.add_argument("--doc-sep", default="blank",
                   help="what one document is in a text file: blank (blocks separated by blank lines; default), "
                        "line, file, wikiextractor (<doc ...> ... </doc> blocks), or any other string, a literal "
                        "separator such as '<|endoftext|>' (TinyStories)")
    p.add_argument("--hub-split", default="train", help="split of a Hugging Face dataset to read (default: train)")
    p.add_argument("--hub-config", default=None, help="configuration (subset) of a Hugging Face dataset")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.05,
                     help="fraction of the documents held out for validation, at least one (default: 0.05)")
    val.add_argument("--val-docs", type=int, default=None, help="number of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of validation documents (default: 0)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=int, default=8192,
                     help="train a byte-level BPE with this many tokens on the train documents (default: 8192)")
    tok.add_argument("--tokenizer", default=None,
                     help="reuse this tokenizer.json, or the one in this folder (e.g. a pretrained model's)")
    p.add_argument("--bot-token", default=None,
                   help="with --tokenizer: the token that begins each document (default: its config's bos_token, "
                        "else [BOT])")
    p.add_argument("--eot-token", default=None,
                   help="with --tokenizer: the token that ends each document (default: its config's eos_token, "
                        "else [EOT])")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"most tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    args = p.parse_args(argv)
    smallest = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    for flag, value, ok, rule in (("--vocab-size", args.vocab_size, args.vocab_size >= smallest,
                                   f"at least {smallest} (the 256 bytes and 3 special tokens)"),
                                  ("--shard-tokens", args.shard_tokens, args.shard_tokens >= 1, "at least 1"),
                                  ("--val-fraction", args.val_fraction, 0 <= args.val_fraction < 1, "in [0, 1)"),
                                  ("--val-docs", args.val_docs, args.val_docs is None or args.val_docs >= 0,
                                   "at least 0")):
        if not ok:
            raise UsageError(f"{flag} must be {rule}, got {value}")
    if args.tokenizer is None and (args.bot_token or args.eot_token):
        raise UsageError("--bot-token and --eot-token apply to a reused --tokenizer; a trained one has [BOT] and [EOT]")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = prepare(args.input, args.out, fmt=args.format, text_field=args.text_field, doc_sep=args.doc_sep,
                         hub_config=args.hub_config, hub_split=args.hub_split, val_fraction=args.val_fraction,
                         val_docs=args.val_docs, seed=args.seed, vocab_size=args.vocab_size,
                         tokenizer=args.tokenizer, bot_token=args.bot_token, eot_token=args.eot_token,
                         shard_tokens=args.shard_tokens, force=args.force, progress=True)
    except (ValueError, OSError) as error:
        return report(error)
    if result.up_to_date:
        print(f"{args.out} is up to date (same inputs and settings); pass --force to rebuild it")
        return 0
    meta = result.meta
    print(f"source: {meta['source']}")
    for name, split in meta["splits"].items():
        print(f"{name:>5}: {split['tokens']:,} tokens, {split['documents']:,} documents, {len(split['shards'])} "
              f"shard(s), {split['bytes'] / max(split['tokens'], 1):.2f} bytes/token")
    if meta["tokenizer"]["trained"]:
        print(f"tokenizer: trained {meta['vocab_size']:,} tokens in {result.tokenizer_seconds:.1f} s")
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    print(f"encoded {tokens:,} tokens in {result.encode_seconds:.1f} s: "
          f"{tokens / max(result.encode_seconds, 1e-9):,.0f} tokens/s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
