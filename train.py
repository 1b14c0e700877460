"""Pretrain a Llama on token shards made by data/prepare.py.

    python train.py --data data/shakespeare --preset small --max-steps 2000 --out checkpoints/shakespeare
    python train.py --data data/shakespeare --out checkpoints/shakespeare --resume      # after a stop
    torchrun --nproc_per_node 8 train.py --data data/fineweb --preset 125m --compile   # 8 GPUs, DDP

The run folder gets step_N/ checkpoints (loadable by generate.py and load_pretrained), a `latest`
pointer and metrics.jsonl; `python -m llama.plot RUN_DIR` draws the loss curves. Ctrl-C saves a
checkpoint and stops; --resume continues exactly where the run stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from llama import Llama, LlamaConfig, Tokenizer
from llama.config import PRESETS
from llama.data import PretrainLoader, TokenShards, check_vocab_size, eval_batches
from llama.trainer import Distributed, Trainer, TrainConfig, check_run_folder, run_training

MODEL_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "rope_theta")
# Settings that may change when resuming: how long, how often, how fast. Everything else must match.
RESUMABLE_CHANGES = {"max_steps", "max_tokens", "eval_every", "eval_tokens", "save_every", "keep_last", "compile",
                     "resume", "config", "out", "sample_prompt", "device"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file with any of these settings (keys as flag names); flags override it")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size preset (default: small)")
    for field in MODEL_FIELDS:
        g.add_argument(f"--{field.replace('_', '-')}", type=float if field == "rope_theta" else int, default=None,
                       help=f"override the preset's {field}")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", help="folder of token shards from data/prepare.py")
    g.add_argument("--out", default="checkpoints/run", help="run folder for checkpoints and metrics (default: checkpoints/run)")
    g.add_argument("--sequential-data", action="store_true",
                   help="read the training windows in order instead of at random positions")
    g = p.add_argument_group("length")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps to train (default: 1000)")
    length.add_argument("--max-tokens", type=int, default=None, help="train on this many tokens instead")
    g = p.add_argument_group("batch")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default: 8)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    accum = g.add_mutually_exclusive_group()
    accum.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: 1)")
    accum.add_argument("--tokens-per-step", type=int, default=None,
                       help="tokens per optimizer step over all processes; sets --grad-accum")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    g.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine (default: 1e-4)")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (default: 100)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matmul weights (default: 0.1)")
    g = p.add_argument_group("speed")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto is bfloat16 on CUDA and float32 on CPU (default: auto)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on a GPU)")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun instead of DDP")
    g = p.add_argument_group("reporting and saving")
    g.add_argument("--eval-every", type=int, default=200, help="evaluate every N steps, and at the end (default: 200)")
    g.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per evaluation (default: 65536)")
    g.add_argument("--sample-prompt", default="Once upon a time, there was",
                   help="prompt for the sample written at each evaluation ('' for none)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps, and at the end (default: 500)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default: 3)")
    g.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    g.add_argument("--seed", type=int, default=0, help="seed for initialization and data order (default: 0)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults taken from --config FILE when given."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv)[0].config
    if config_file:
        try:
            settings = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"cannot read --config {config_file}: {e}")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(k.replace("-", "_") for k in settings) - known)
        if unknown:
            parser.error(f"{config_file} has unknown settings {unknown}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in settings.items()})
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data is required, on the command line or in --config")
    return args


def model_config(args: argparse.Namespace, vocab_size: int) -> LlamaConfig:
    overrides = {f: getattr(args, f) for f in MODEL_FIELDS if getattr(args, f) is not None}
    return LlamaConfig.from_preset(args.preset, vocab_size=vocab_size,
                                   max_seq_len=max(args.seq_len, PRESETS[args.preset].get("max_seq_len", 0)),
                                   **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_training(lambda dist_info: build(args, dist_info), args.resume)


def build(args: argparse.Namespace, dist_info: Distributed) -> tuple[Trainer, str]:
    """The model, data and Trainer for a pretraining run, and a line that describes it."""
    train = TokenShards(args.data, "train")
    tokenizer = Tokenizer.load(train.tokenizer_file)
    config = model_config(args, vocab_size=tokenizer.vocab_size)
    check_vocab_size(train, config.vocab_size)
    global_batch = args.batch_size * args.seq_len * dist_info.world_size
    grad_accum = args.grad_accum or 1
    if args.tokens_per_step:
        if args.tokens_per_step % global_batch:
            raise ValueError(f"--tokens-per-step {args.tokens_per_step} is not a multiple of batch-size x seq-len "
                             f"x processes = {global_batch}")
        grad_accum = args.tokens_per_step // global_batch
    max_steps = (math.ceil(args.max_tokens / (global_batch * grad_accum)) if args.max_tokens
                 else args.max_steps or 1000)
    out = Path(args.out)
    check_run_folder(out, args.resume, dist_info)

    torch.manual_seed(args.seed)
    model = Llama(config)
    loader = PretrainLoader(train, args.batch_size, args.seq_len, rank=dist_info.rank,
                            world_size=dist_info.world_size, seed=args.seed, sequential=args.sequential_data)
    val_folder = Path(args.data)
    val = TokenShards(val_folder, "val") if any(val_folder.glob("val_*.bin")) else None
    fixed = eval_batches(val, args.batch_size, args.seq_len, args.eval_tokens) if val else None
    evals = (lambda: fixed) if fixed else None  # the same validation slice at every evaluation, read once
    train_config = TrainConfig(
        max_steps=max_steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_accum=grad_accum, eval_every=args.eval_every,
        save_every=args.save_every, keep_last=args.keep_last, dtype=args.dtype, compile=args.compile,
        fsdp=args.fsdp, seed=args.seed, sample_prompt=args.sample_prompt or None)
    run_args = {k: v for k, v in vars(args).items() if k not in RESUMABLE_CHANGES}
    run_args.update(model_config=dataclasses.asdict(config), grad_accum=grad_accum, world_size=dist_info.world_size)
    trainer = Trainer(model, tokenizer, loader, evals, train_config, out, run_args, dist_info)
    return trainer, (f"model: {args.preset}, {model.num_params() / 1e6:.1f}M parameters; {max_steps} steps of "
                     f"{global_batch * grad_accum:,} tokens; run folder {out}")


if __name__ == "__main__":
    sys.exit(main())
