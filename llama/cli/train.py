"""Pretrain a Llama on token shards made by data/prepare.py.

    python train.py --data runs/data/shakespeare --preset small --max-steps 2000 --out runs/shakespeare
    python train.py --data runs/data/shakespeare --out runs/shakespeare --resume       # after a stop
    torchrun --nproc_per_node 8 train.py --data runs/data/fineweb --preset 125m --compile   # 8 GPUs, DDP

--data is a folder that data/prepare.py wrote, e.g. from `python data/prepare.py --input
data/tinyshakespeare/input.txt --out runs/data/shakespeare` after `python data/download.py tinyshakespeare`.

The run folder gets step_N/ checkpoints (loadable by generate.py and load_pretrained), a `latest`
pointer and metrics.jsonl; `python -m llama.plot RUN_DIR` draws the loss curves. Ctrl-C saves a
checkpoint and stops; --resume continues exactly where the run stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from ..checkpoint import check_resumable, check_run_folder
from ..config import PRESETS, LlamaConfig
from ..data import PretrainLoader, TokenShards, check_vocab_size, eval_batches
from ..files import read_json
from ..model import Llama
from ..settings import above, add_flags, at_least, defaults, option, run_identity, setting_problem, settings_from
from ..tokenizer import Tokenizer
from ..trainer import LENGTH, Distributed, Trainer, TrainConfig
from .common import benchmarks, check_eval_flags, check_resumed_command, exit_code, fit
from .usage import ArgumentParser, UsageError

MODEL = "model (the preset's values unless overridden)"
DATA = "data"


@dataclasses.dataclass
@defaults(out="checkpoints/run", batch_size=8, grad_accum=None, lr=1e-3, min_lr=1e-4, warmup_steps=100,
          eval_every=200, save_every=500, keep_last=3, sample_prompt="Once upon a time, there was")
class TrainSettings(TrainConfig):
    """Every setting of a pretraining run; each is also a flag of train.py (see --help): the training
    settings every run shares (TrainConfig, with pretraining's defaults) and these."""

    preset: str = option("small", "model size preset (default: small)", choices=sorted(PRESETS), group=MODEL)
    hidden_size: int | None = option(None, "override the preset's hidden_size", at_least(1), group=MODEL)
    intermediate_size: int | None = option(None, "override the preset's intermediate_size", at_least(1), group=MODEL)
    num_layers: int | None = option(None, "override the preset's num_layers", at_least(1), group=MODEL)
    num_heads: int | None = option(None, "override the preset's num_heads", at_least(1), group=MODEL)
    num_kv_heads: int | None = option(None, "override the preset's num_kv_heads", at_least(1), group=MODEL)
    head_dim: int | None = option(None, "override the preset's head_dim", at_least(1), group=MODEL)
    rope_theta: float | None = option(None, "override the preset's rope_theta", above(0), group=MODEL)
    data: str | None = option(None, "folder of token shards from data/prepare.py", group=DATA)
    sequential_data: bool = option(False, "read the training windows in order instead of at random positions",
                                   group=DATA)
    max_tokens: int | None = option(None, "train on this many tokens instead of --max-steps (default: 1000 steps)",
                                    at_least(1), group=LENGTH, exclusive="length")
    seq_len: int = option(256, "tokens per sequence (default: 256)", at_least(1), group=LENGTH)
    tokens_per_step: int | None = option(None, "tokens per optimizer step over all processes; sets --grad-accum",
                                         at_least(1), group=LENGTH, exclusive="accumulation")
    eval_tokens: int = option(65536, "validation tokens per evaluation (default: 65536)", at_least(1), group=DATA)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eval_flags(self)

    def model_config(self, vocab_size: int) -> LlamaConfig:
        """The preset with the overridden fields, its context at least seq_len."""
        overrides = {name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name) is not None}
        try:
            return LlamaConfig.from_preset(self.preset, vocab_size=vocab_size,
                                           max_seq_len=max(self.seq_len, PRESETS[self.preset].get("max_seq_len", 0)),
                                           **overrides)
        except ValueError as e:
            flags = "".join(f" --{name.replace('_', '-')} {value}" for name, value in overrides.items())
            raise ValueError(f"--preset {self.preset}{flags} describes no model: {e}") from None


MODEL_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "rope_theta")
# What a run is: --resume refuses a checkpoint made with other values of these (and of the model config,
# grad_accum and world_size they lead to). The others may change between a run and its resumption.
DEFINES_RUN = ("preset", *MODEL_FIELDS, "data", "sequential_data", "batch_size", "seq_len", "grad_accum",
               "tokens_per_step", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "dtype", "fsdp", "seed")
MAY_CHANGE = ("out", "max_steps", "max_tokens", "compile", "log_every", "eval_every", "eval_tokens", "no_initial_eval",
              "sample_prompt", "eval_tasks", "eval_data_dir", "save_every", "keep_last", "resume")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with any of these settings (keys as flag names); flags override it")
    add_flags(parser, TrainSettings)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainSettings:
    """Flags, with defaults taken from --config FILE when given."""
    parser = build_parser()
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv)[0].config
    if config_file:
        settings = {key.replace("-", "_"): value for key, value in read_json(config_file).items()}
        known = {field.name for field in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UsageError(f"{config_file} has unknown settings {unknown}; its keys are train.py's flags")
        for name, value in settings.items():
            if problem := setting_problem(TrainSettings, name, value):
                raise UsageError(f"{config_file}: {name!r} {problem}, got {value!r}")
        parser.set_defaults(**settings)
    args = parser.parse_args(argv)
    if not args.data:
        raise UsageError("--data is required, on the command line or in --config")
    return settings_from(TrainSettings, args)


def main(argv: list[str] | None = None) -> int:
    return exit_code(lambda: run(parse_args(argv)))


def run(settings: TrainSettings) -> Path:
    """Pretrain as `settings` say (under torchrun, as this process's rank); returns the run folder."""
    return fit(lambda dist_info: build(settings, dist_info), settings.resume, settings.out)


def build(s: TrainSettings, dist_info: Distributed) -> tuple[Trainer, str]:
    """The model, data and Trainer for a pretraining run, and a line that describes it."""
    if not s.data:
        raise ValueError("no --data: pass the folder of token shards that data/prepare.py wrote")
    train = TokenShards(s.data, "train")
    tokenizer = Tokenizer.load(train.tokenizer_file)
    config = s.model_config(vocab_size=tokenizer.vocab_size)
    check_vocab_size(train, config.vocab_size)
    global_batch = s.batch_size * s.seq_len * dist_info.world_size
    grad_accum = s.grad_accum or 1  # None: 1, or what --tokens-per-step gives
    if s.tokens_per_step:
        if s.tokens_per_step % global_batch:
            raise ValueError(f"--tokens-per-step {s.tokens_per_step} is not a multiple of batch-size x seq-len "
                             f"x processes = {global_batch}")
        grad_accum = s.tokens_per_step // global_batch
    max_steps = (math.ceil(s.max_tokens / (global_batch * grad_accum)) if s.max_tokens is not None
                 else s.max_steps if s.max_steps is not None else 1000)
    scorer = benchmarks(s)  # their data is read now, not at the first evaluation
    if scorer is not None:
        scorer.for_model(tokenizer, config.max_seq_len)
    out = Path(s.out)
    check_run_folder(out, s.resume, main_process=dist_info.is_main)
    if s.resume:
        check_resumed_command(out, "train.py")

    torch.manual_seed(s.seed)
    model = Llama(config)
    loader = PretrainLoader(train, s.batch_size, s.seq_len, rank=dist_info.rank, world_size=dist_info.world_size,
                            seed=s.seed, sequential=s.sequential_data)
    val_folder = Path(s.data)
    val = TokenShards(val_folder, "val") if any(val_folder.glob("val_*.bin")) else None
    fixed = eval_batches(val, s.batch_size, s.seq_len, s.eval_tokens) if val else None
    evals = (lambda: fixed) if fixed else None  # the same validation slice at every evaluation, read once
    identity = run_identity(s, DEFINES_RUN, model_config=dataclasses.asdict(config), grad_accum=grad_accum,
                            world_size=dist_info.world_size)
    if s.resume:
        check_resumable(out, identity)
    trainer = Trainer(model, tokenizer, loader, evals, dataclasses.replace(s, max_steps=max_steps, grad_accum=grad_accum),
                      out, identity, dist_info, benchmarks=scorer, seq_len=s.seq_len)
    return trainer, (f"model: {s.preset}, {model.num_params() / 1e6:.1f}M parameters; {max_steps} steps of "
                     f"{global_batch * grad_accum:,} tokens; run folder {out}")


if __name__ == "__main__":
    sys.exit(main())
