"""The whole training loop against the bare step: what data loading, logging and bookkeeping cost.

The bare step is forward, loss, backward and AdamW on one fixed batch (as in train_step.py). The loop
is llama.trainer.Trainer.fit on token shards, with its progress bar, metrics.jsonl, clipping and the
data loader; evaluation is off and it saves only its final checkpoint. Both train the same preset at
the same batch shape, alternating in one process.

    python data/prepare.py --input ../shared/data/tinyshakespeare --out data/shakespeare --vocab-size 4096
    python benchmarks/train_loop.py --data data/shakespeare
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from llama import Llama, LlamaConfig, Tokenizer
from llama.data import PretrainLoader, TokenShards
from llama.trainer import Trainer, TrainConfig, build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="token shards from data/prepare.py")
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--steps", type=int, default=5, help="steps per measurement (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    args = parser.parse_args()

    shards = TokenShards(args.data)
    tokenizer = Tokenizer.load(shards.tokenizer_file)
    torch.manual_seed(0)
    initial = Llama(LlamaConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size))
    config = TrainConfig(max_steps=args.steps, eval_every=0, save_every=0, keep_last=1, seq_len=args.seq_len)
    batch = next(PretrainLoader(shards, args.batch_size, args.seq_len))
    tokens = args.steps * batch.input_ids.numel()

    def bare() -> float:
        model = copy.deepcopy(initial).train()
        optimizer = build_optimizer(model, config)
        start = time.perf_counter()
        for _ in range(args.steps):
            model.loss(batch.input_ids, batch.targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return tokens / (time.perf_counter() - start)

    def loop() -> float:
        with tempfile.TemporaryDirectory() as out:
            loader = PretrainLoader(shards, args.batch_size, args.seq_len)
            trainer = Trainer(copy.deepcopy(initial), tokenizer, loader, None, config, out,
                              {}, device=torch.device("cpu"))
            start = time.perf_counter()
            trainer.fit()
            return tokens / (time.perf_counter() - start)

    bare(), loop()  # warm-up
    rates = {"bare step": [], "training loop": []}
    for _ in range(args.rounds):
        rates["bare step"].append(bare())
        rates["training loop"].append(loop())
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, {args.steps} steps per measurement, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, rate in medians.items():
        print(f"{name:>14}: {rate:8.0f} tokens/s  (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})")
    print(f"loop / bare: {medians['training loop'] / medians['bare step']:.3f}")


if __name__ == "__main__":
    main()
