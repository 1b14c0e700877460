"""A compiled pretraining run against an eager one: same settings, data, initial weights and schedule.

Once, torch.compile traced our loss's gradients into zeros and a compiled run's loss stayed flat while
the eager one fell; the timings of that run compared different work. Here two Trainers come from
train.py's own build() with the same settings, one with --compile, and take the same steps on the same
batches, in alternating windows of steps (so both see the same machine state); each window's time ends
when its last loss is read. The script prints the two loss curves side by side, each one's tokens/s (the
median window, the first, compiling, left out) and MFU on a GPU, and ends with an error when the
compiled loss did not fall like the eager one.

    python benchmarks/compiled_training.py --data runs/gpu_suite/pretraining/data   # pretraining.py's GPU shape
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama.cli import train
from llama.trainer import Distributed, peak_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="token shards from data/prepare.py (or from "
                                                      "experiments/pretraining.py --prepare-only)")
    # the defaults: the first 300 steps of experiments/pretraining.py --size gpu
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--steps", type=int, default=300, help="steps each run takes (default: 300)")
    parser.add_argument("--schedule-steps", type=int, default=2000,
                        help="the runs' --max-steps, which sets the learning-rate schedule (default: 2000)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (default: 100)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window (default: 10)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (default: inductor, as train.py --compile; aot_eager checks "
                             "the pipeline quickly)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, compiled in (("eager", False), ("compiled", True)):
            settings = train.TrainSettings(
                data=args.data, preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
                max_steps=max(args.schedule_steps, args.steps), warmup_steps=args.warmup_steps, lr=args.lr,
                min_lr=args.lr / 10, eval_every=0, save_every=0, sample_prompt="", compile=compiled,
                out=str(Path(folder) / name))
            runs[name], _ = train.build(settings, Distributed())  # each seeds its own init and data order
        if args.compile_backend != "inductor":
            compiled_module = runs["compiled"].loss_module
            runs["compiled"].loss_module = torch.compile(compiled_module._orig_mod, backend=args.compile_backend)
        losses: dict[str, list[torch.Tensor]] = {name: [] for name in runs}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for start in range(0, args.steps, args.window):
            for name, trainer in runs.items():
                begin = time.perf_counter()
                tokens = 0
                for _ in range(min(args.window, args.steps - start)):
                    stats = trainer.train_step()
                    losses[name].append(stats["loss"])
                    tokens += stats["tokens"]
                losses[name][-1].item()  # waits for the device to finish the window
                rates[name].append(tokens / (time.perf_counter() - begin))
        curves = {name: torch.stack(values).tolist() for name, values in losses.items()}
        trainer = runs["eager"]

    device = trainer.device
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"machine: {machine}, torch {torch.__version__}; {args.preset} preset "
          f"({trainer.model.num_params() / 1e6:.1f}M params), batch {args.batch_size} x {args.seq_len}, "
          f"{args.steps} steps of a {max(args.schedule_steps, args.steps)}-step schedule")
    medians = {name: statistics.median(r[1:] or r) for name, r in rates.items()}
    peak = peak_flops(device)
    flops = trainer.model.flops_per_token(args.seq_len)
    mfu = {name: rate * flops / peak if peak else None for name, rate in medians.items()}
    for name, rate in medians.items():
        shown = f"  MFU {100 * mfu[name]:.1f}%" if peak else ""
        print(f"{name:>9}: {rate:10.0f} tokens/s{shown}  (windows: {', '.join(f'{r:.0f}' for r in rates[name])})")
    print(f"compiled / eager: {medians['compiled'] / medians['eager']:.3f}")
    print("step      eager   compiled")
    for step in sorted({*range(0, args.steps, max(1, args.steps // 10)), args.steps - 1}):
        print(f"{step + 1:>4} {curves['eager'][step]:10.4f} {curves['compiled'][step]:10.4f}")

    tail = max(1, args.steps // 5)  # the last fifth of the steps, averaged: single steps are noisy
    end = {name: statistics.fmean(curve[-tail:]) for name, curve in curves.items()}
    drop = curves["eager"][0] - end["eager"]
    alike = abs(end["compiled"] - end["eager"]) <= 0.1 * abs(drop) + 0.02 and curves["compiled"][0] > end["compiled"]
    print(f"mean loss of the last {tail} steps: eager {end['eager']:.4f}, compiled {end['compiled']:.4f} "
          f"(from {curves['eager'][0]:.4f} and {curves['compiled'][0]:.4f})")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine, "torch": torch.__version__, "preset": args.preset, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "steps": args.steps, "tokens_per_s": medians, "windows": rates, "mfu": mfu,
            "losses": curves, "trained_alike": alike}, indent=2) + "\n")
    if not alike:
        sys.exit("error: the compiled run's loss did not fall like the eager run's: compiled training is broken")


if __name__ == "__main__":
    main()
