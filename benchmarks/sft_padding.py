"""Fine-tuning throughput by batching strategy: the article's full-length padding against dynamic padding
with length grouping, and against packing, on the same Alpaca examples.

Each strategy trains one epoch (forward, loss, backward, AdamW) over the same `--examples` rows drawn at
random from the first `--rows` rows of Alpaca, from the same initial weights. What matters is useful tokens
per second: tokens that count in the loss (responses and their EOT). Padding to the full sequence length
spends most of the compute on pads; packing spends a little on the per-example attention mask.
It also prints, for all `--rows` rows, how many steps an epoch takes and what fraction of the computed
positions are pads under each strategy.

    python benchmarks/sft_padding.py --preset small --examples 64 --batch-size 8
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from llama import Llama, LlamaConfig, Tokenizer
from llama.batch import Batch, collate
from llama.rows import load_rows
from llama.examples import FineTuningDataset, LengthGroupedSampler, PackedDataset

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca"


def padded_to(batch: Batch, length: int, pad_id: int) -> Batch:
    """The article's batches: every row right-padded to the full sequence length."""
    extra = length - batch.input_ids.shape[1]
    pad = torch.nn.functional.pad
    return Batch(pad(batch.input_ids, (0, extra), value=pad_id), pad(batch.targets, (0, extra), value=pad_id),
                 pad(batch.loss_mask, (0, extra), value=False))


def strategy_batches(dataset: FineTuningDataset, strategy: str, batch_size: int, max_len: int) -> list[Batch]:
    """One epoch of batches over the dataset."""
    data = PackedDataset(dataset) if strategy == "packed" else dataset
    # the article's order is random: mega_batch=1 only sorts inside each batch, which padding to full ignores
    sampler = LengthGroupedSampler(data.lengths, batch_size, seed=0, mega_batch=1 if strategy == "full" else 50)
    batches = [collate([data[i] for i in indices], pad_id=dataset.pad_id) for indices in sampler]
    return [padded_to(b, max_len, dataset.pad_id) for b in batches] if strategy == "full" else batches


def train_epoch(config: LlamaConfig, batches: list[Batch]) -> float:
    """Seconds to train on every batch once, from the same initial weights as every other strategy."""
    torch.manual_seed(0)
    model = Llama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    start = time.perf_counter()
    for batch in batches:
        loss = model.loss(batch.input_ids, batch.targets, batch.loss_mask, attn_mask=batch.attn_mask())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--rows", type=int, default=500, help="Alpaca rows to tokenize (default: 500)")
    parser.add_argument("--examples", type=int, default=64,
                        help="how many of those rows each strategy trains on (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    parser.add_argument("--max-len", type=int, default=None, help="sequence length (default: the preset's)")
    args = parser.parse_args()

    files = sorted(ALPACA.glob("alpaca_data_part00_*.json"))
    part = list(load_rows(files))
    rows = part[:args.rows]
    config = LlamaConfig.from_preset(args.preset)
    max_len = args.max_len or config.max_seq_len
    texts = [row[field] for row in part for field in ("instruction", "input", "output")]  # the whole file
    tokenizer = Tokenizer.train(texts, vocab_size=config.vocab_size)
    dataset = FineTuningDataset(rows, tokenizer, template="alpaca", max_len=max_len)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; preset {args.preset}, max_len {max_len}, batch size {args.batch_size}; {dataset.stats}")

    strategies = ("full", "grouped", "packed")
    print(f"\nall {len(dataset)} examples: steps per epoch and share of computed positions that are pads")
    for strategy in strategies:
        batches = strategy_batches(dataset, strategy, args.batch_size, max_len)
        computed = sum(b.input_ids.numel() for b in batches)
        real = sum(int((b.input_ids != dataset.pad_id).sum()) for b in batches)
        print(f"  {strategy:8s} {len(batches):5d} steps   {1 - real / computed:6.1%} pads")

    chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:args.examples].tolist()
    subset = FineTuningDataset([rows[i] for i in chosen], tokenizer, template="alpaca", max_len=max_len)
    train_epoch(config, strategy_batches(subset, "grouped", args.batch_size, max_len)[:1])  # warm up
    print(f"\none epoch over the same {len(subset)} examples, from the same initial weights")
    print(f"  {'strategy':8s} {'steps':>5s} {'positions':>9s} {'counted':>8s} {'wall s':>7s} {'counted tok/s':>13s}")
    for strategy in strategies:
        batches = strategy_batches(subset, strategy, args.batch_size, max_len)
        seconds = train_epoch(config, batches)
        counted = sum(b.num_counted for b in batches)
        positions = sum(b.input_ids.numel() for b in batches)
        print(f"  {strategy:8s} {len(batches):5d} {positions:9d} {counted:8d} {seconds:7.1f} {counted / seconds:13.0f}")


if __name__ == "__main__":
    main()
