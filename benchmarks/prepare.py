"""Data preparation throughput on a real corpus: reading, BPE training and encoding, timed separately,
then the cost of one PretrainLoader batch from the shards it wrote.

The default corpus is the 51 MB English Wikipedia sample in WikiExtractor format (shared/data). The
datasets cache goes to a temporary folder, so reading is timed cold on every run.

    python benchmarks/prepare.py
    python benchmarks/prepare.py --input ../shared/data/tinystories_sample --doc-sep '<|endoftext|>'
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import tokenizers
import torch

from llama.data import PretrainLoader, TokenShards, prepare

ENWIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki_wikiextractor_sample"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def batch_microseconds(shards: TokenShards, batch_size: int, seq_len: int, sequential: bool, n: int = 300) -> float:
    """Median time to produce one batch, in microseconds."""
    loader = PretrainLoader(shards, batch_size, seq_len, sequential=sequential)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(ENWIKI), help="corpus (default: the WikiExtractor enwiki sample)")
    parser.add_argument("--doc-sep", default="wikiextractor", help="how text files split into documents")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    parser.add_argument("--batch-size", type=int, default=8, help="loader batch size (default: 8)")
    parser.add_argument("--seq-len", type=int, default=1024, help="loader sequence length (default: 1024)")
    args = parser.parse_args()
    if not Path(args.input).exists():
        sys.exit(f"error: {args.input} does not exist; pass --input")

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        datasets.config.HF_DATASETS_CACHE = str(Path(tmp) / "hf-cache")
        result = prepare(args.input, Path(tmp) / "out", doc_sep=args.doc_sep, vocab_size=args.vocab_size,
                         val_docs=100, force=True)
        meta = result.meta
        train, val = meta["splits"]["train"], meta["splits"]["val"]
        shards = TokenShards(Path(tmp) / "out")
        random_us = batch_microseconds(shards, args.batch_size, args.seq_len, sequential=False)
        sequential_us = batch_microseconds(shards, args.batch_size, args.seq_len, sequential=True)

    text_bytes, tokens = train["bytes"] + val["bytes"], train["tokens"] + val["tokens"]
    text_mb, train_mb = text_bytes / 1e6, train["bytes"] / 1e6
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs: timings are noisy), "
          f"tokenizers {tokenizers.__version__}, datasets {datasets.__version__}, torch {torch.__version__}")
    print(f"corpus: {meta['source']}: {train['documents'] + val['documents']:,} documents, {text_mb:.1f} MB of text, "
          f"{tokens:,} tokens at vocab {meta['vocab_size']:,} ({text_bytes / tokens:.2f} bytes/token)")
    print(f"read + split documents: {result.load_seconds:6.1f} s  {text_mb / result.load_seconds:6.1f} MB/s")
    print(f"BPE training (train):   {result.tokenizer_seconds:6.1f} s  {train_mb / result.tokenizer_seconds:6.1f} MB/s"
          f"  {train['tokens'] / result.tokenizer_seconds:11,.0f} tokens/s")
    print(f"encoding (train + val): {result.encode_seconds:6.1f} s  {text_mb / result.encode_seconds:6.1f} MB/s"
          f"  {tokens / result.encode_seconds:11,.0f} tokens/s")
    print(f"PretrainLoader batch {args.batch_size} x {args.seq_len}: {random_us:.0f} us random, "
          f"{sequential_us:.0f} us sequential (median)")


if __name__ == "__main__":
    main()
