"""The training loop shared by train.py (pretraining) and finetune.py (SFT, classification, DPO): one loop, not copies.

What it takes care of, so that the scripts don't have to:
- AdamW without decay on norms and embeddings; linear warmup, then cosine decay to min_lr; clipping.
- Gradient accumulation that weighs every counted token equally: each micro-batch's summed loss is
  divided by the number of counted tokens in the whole optimizer step (on all ranks together). A task
  with another loss passes its objective (TokenLoss says how), which counts its own units (DPO: pairs).
- bf16 autocast on CUDA, optional torch.compile, DDP or FSDP2 under torchrun.
- A tqdm bar (loss, lr, tokens/s, MFU on a GPU) and metrics.jsonl; evaluation with perplexity, a
  sample and benchmark scores (--eval-tasks); atomic checkpoints that keep the last K; exact resume;
  Ctrl-C and SIGTERM (what Slurm and Kubernetes send before they kill a job) save before they stop.
- No wait for the device inside a step: a step's numbers stay on the device and are read back every
  log_every steps (and before each evaluation and save), so the GPU never idles while Python catches up.
- A NaN or inf loss or gradient norm changes no weight (the fused AdamW skips that update on the
  device, as it does for GradScaler), and the run stops at the next read-back, before anything is
  evaluated or saved: the checkpoints kept are the good ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint, lora
from .batch import Batch
from .evaluation import TASKS as BENCHMARKS
from .files import append_line, check_output_path, is_disk_full, read_jsonl, write_text_atomically
from .model import Llama
from .settings import above, at_least, check_settings, fraction, option
from .tokenizer import Tokenizer

# The signals that save and stop a run, and what the run says when one comes.
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}
# Dense bf16 peak FLOP/s by GPU name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


OUTPUT = "output"
LENGTH = "length and batches"
OPTIMIZER = "optimizer"
SPEED = "speed"
REPORTING = "reporting and saving"
EVALUATION = "benchmarks at each evaluation"
EVAL_TASKS_HELP = ("score these benchmarks at each evaluation (the validation's cadence, and the end) and log "
                   "eval/TASK/METRIC: a comma list of TASK or TASK:LIMIT (its first LIMIT items; no limit: the "
                   f"whole split), e.g. piqa:500,hellaswag:200. Tasks: {', '.join(BENCHMARKS)} (default: none)")
EVAL_DATA_DIR_HELP = ("folder holding the tasks' data as `python3 data/download.py TASK` writes it, one TASK/ "
                      "folder each (default: the repository's data/)")


@dataclasses.dataclass
class TrainConfig:
    """The settings every training run shares, declared once: train.py's and finetune.py's flags (each
    command with its own defaults, `settings.defaults`), and what the Trainer reads, as they are.

    A command fills in what it derives before it hands them over: max_steps from --epochs or --max-tokens,
    grad_accum from --tokens-per-step. grad_clip and sample_tokens are not flags.
    """

    out: str = option("checkpoints/run", "run folder for checkpoints and metrics (default: checkpoints/run)",
                      group=OUTPUT)
    max_steps: int | None = option(None, "optimizer steps to train", at_least(1), group=LENGTH, exclusive="length")
    batch_size: int = option(8, "sequences per micro-batch per process (default: 8)", at_least(1), group=LENGTH)
    grad_accum: int | None = option(1, "micro-batches per optimizer step (default: 1)", at_least(1), group=LENGTH,
                                    exclusive="accumulation")
    lr: float = option(3e-4, "peak learning rate (default: 3e-4)", above(0), group=OPTIMIZER)
    min_lr: float = option(3e-5, "learning rate at the end of the cosine (default: 3e-5)", at_least(0),
                           group=OPTIMIZER)
    warmup_steps: int = option(0, "linear warmup steps (default: 0)", at_least(0), group=OPTIMIZER)
    weight_decay: float = option(0.1, "AdamW weight decay on matmul weights (default: 0.1)", at_least(0),
                                 group=OPTIMIZER)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas (default: 0.9 0.95)", fraction, group=OPTIMIZER)
    dtype: str = option("auto", "autocast dtype; auto is bfloat16 on CUDA and float32 on CPU (default: auto)",
                        choices=["auto", "float32", "bfloat16", "float16"], group=SPEED)
    compile: bool = option(False, "torch.compile the model (worth it on a GPU)", group=SPEED)
    fsdp: bool = option(False, "shard the model with FSDP2 under torchrun instead of DDP", group=SPEED)
    log_every: int = option(10, "read the loss back from the device, update the bar and write metrics.jsonl every N "
                                "steps; reading it every step would make the GPU wait (default: 10)", at_least(1),
                            group=REPORTING)
    eval_every: int = option(0, "evaluate every N steps, and at the end; 0: only at the end (default: 0)",
                             at_least(0), group=REPORTING)
    no_initial_eval: bool = option(False, "skip the evaluation at step 0 (the model as it starts, the baseline every "
                                          "validation curve starts from), for quick trials", group=REPORTING)
    sample_prompt: str | None = option(None, "prompt answered at each evaluation ('' for none) (default: none)",
                                       group=REPORTING)
    eval_tasks: str | None = option(None, EVAL_TASKS_HELP, metavar="TASK[:LIMIT],...", group=EVALUATION)
    eval_data_dir: str | None = option(None, EVAL_DATA_DIR_HELP, metavar="DIR", group=EVALUATION)
    save_every: int = option(0, "checkpoint every N steps, and at the end; 0: only at the end (default: 0)",
                             at_least(0), group=REPORTING)
    keep_last: int = option(3, "checkpoints to keep; 0 keeps all (default: 3)", at_least(0), group=REPORTING)
    resume: bool = option(False, "continue from the run folder's latest checkpoint", group=REPORTING)
    seed: int = option(0, "seed for initialization, data order and sampling (default: 0)", at_least(0),
                       group=REPORTING)
    grad_clip: float = 1.0  # the gradient norm clipped to
    sample_tokens: int = 48  # tokens of the sample written at each evaluation

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.out = os.fspath(self.out)
        check_settings(self)
        check_output_path(self.out, "--out")  # now: the writers would refuse it at the first save


class TrainingStopped(RuntimeError):
    """The run cannot go on (a NaN loss, say); the last good checkpoint is intact."""


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM while the first one's save was under way: stop at once."""


def _kept(out_dir: Path) -> Path | None:
    """The run's newest checkpoint, None when it has none (or its `latest` names none)."""
    try:
        return checkpoint.latest_checkpoint(out_dir)
    except OSError:
        return None


def _stopped(what: str, value: float, step: int, out_dir: Path, *, updates: int, objective: Any) -> TrainingStopped:
    """The line of a run stopped by a NaN or inf: what became what, where the run stands, and the likely
    cause. `updates`: the optimizer updates made before the value was computed; with none, --lr cannot
    be the cause, and the objective's own advice (advice(before_updates), e.g. DPO's --beta) or the model
    and data are named instead."""
    kept = _kept(out_dir)
    where = f"the last good checkpoint in {out_dir} is intact" if kept else f"{out_dir} holds no checkpoint yet"
    hint = getattr(objective, "advice", lambda before_updates: None)(updates == 0)
    if updates == 0:
        cause = ("before any update, so --lr is not the cause: "
                 + (hint or "the model or the data give values that overflow; check them, or try --dtype float32"))
    else:
        cause = "try a lower --lr" + (f", or {hint}" if hint else "")
    return TrainingStopped(f"the {what} became {value} at step {step}; stopping without saving, {where} ({cause})")


# --- the pieces --------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matmul weights only: norms and embeddings are not decayed.

    Fused on CUDA and on the CPU, where the default (foreach) step is several times slower
    (benchmarks/optimizer_step.py).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "embed_tokens" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(param.device.type in ("cuda", "cpu") for param in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class TokenLoss:
    """The objective of pretraining, SFT and classification: Llama.loss, one unit per counted token.

    An objective is what the loop minimizes, as two methods: loss(model, batch) returns the batch's
    loss summed over its units and a dict of metrics, each also summed over the units; count(batch)
    is the number of units. The loop divides both sums by the units of the whole optimizer step (all
    micro-batches, all ranks), so accumulation never reweights them. A task with another loss (DPO's,
    over preference pairs: llama/preference.py) passes its own objective to the Trainer.
    """

    perplexity = True  # val_ppl = exp(val_loss) means something for a per-token cross-entropy

    def loss(self, model: Llama, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model.loss(batch.input_ids, batch.targets, batch.loss_mask, attn_mask=batch.attn_mask(),
                          reduction="sum"), {}

    def count(self, batch: Batch) -> torch.Tensor:
        return batch.loss_mask.sum()  # on the device: no wait for it


class LossOf(nn.Module):
    """Puts the objective's loss behind forward(), where DDP and FSDP hook in."""

    def __init__(self, model: Llama, objective: Any = None) -> None:
        super().__init__()
        self.model = model
        self.objective = objective or TokenLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective.loss(self.model, batch)


@dataclasses.dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        if "RANK" not in os.environ:
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(value)
        return value


def _implicit_replication(fsdp: bool) -> contextlib.AbstractContextManager:
    """Under FSDP the parameters are DTensors; this lets the optimizer's plain found_inf flag meet them."""
    if not fsdp:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication
    return implicit_replication()


def default_device(dist_info: Distributed) -> torch.device:
    return torch.device(f"cuda:{dist_info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The dtype a TrainConfig.dtype trains under on `device` (None: no autocast, float32)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if dtype == "float32" else getattr(torch, dtype)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def add_sums(into: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    """Add one batch's summed metrics to the running sums, detached."""
    for name, value in sums.items():
        value = value.detach().float()
        into[name] = into[name] + value if name in into else value


# --- the loop ---------------------------------------------------------------------------------------

class Trainer:
    """Trains `model` on `train_batches`, one optimizer step per `grad_accum` micro-batches.

    train_batches: an iterator of Batch (per rank) with state_dict()/load_state_dict() for resume.
    eval_batches: a function returning the fixed validation batches, or None.
    eval_metrics: eval_metrics(model, batches) -> {"val_loss": mean loss per counted position,
    "val_name": number, ...}, for models whose validation scores more than the loss (a classifier's
    accuracy, say): it replaces the loss pass, so each validation batch is run once.
    run_identity: the settings that define the run (llama/cli: DEFINES_RUN); --resume refuses a
    checkpoint made with others. The Trainer only compares them.
    objective: what to minimize (see TokenLoss, the default); its metrics are logged with each
    training step, and with a val_ prefix with each evaluation.
    benchmarks: scores of the model beyond the validation rows, taken at each evaluation (the same
    cadence; with no validation rows, the evaluations happen for them alone): benchmarks(model) returns
    {name: number} to log in the evaluation's record, and benchmarks.summary(numbers) the console line
    about them (llama/cli/common.py: Benchmarks, the --eval-tasks). It is called on every process, in eval
    mode, without gradients and under the validation's autocast, and must not use collectives.
    What the command derives for the run: `sample` (the prompt answered at each evaluation, text that
    gets BOT or ready ids; default config.sample_prompt), `seq_len` (positions per training row, for the
    FLOP count; default the model's context), `base_model` (where a LoRA run's frozen base came from, for
    its adapter_config.json), `adapters_only` (a LoRA run's checkpoints hold the adapters alone) and
    `files` (files(model): the JSON files each checkpoint adds, by name; a fine-tuning task's record), and
    `on_start` (what the run writes into its folder before its first step, called by the main process once
    --resume's checks have passed, so that a refused run writes nothing: DPO's reference log-probabilities).
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, train_batches: Iterator[Batch],
                 eval_batches: Callable[[], Iterable[Batch]] | None, config: TrainConfig, out_dir: str | Path,
                 run_identity: dict[str, Any], dist_info: Distributed | None = None,
                 device: torch.device | None = None,
                 eval_metrics: Callable[[Llama, Iterable[Batch]], dict[str, float]] | None = None,
                 objective: Any = None, benchmarks: Callable[[Llama], dict[str, float]] | None = None, *,
                 sample: str | list[int] | None = None, seq_len: int | None = None, base_model: str | None = None,
                 adapters_only: bool = False, files: Callable[[nn.Module], dict[str, Any]] | None = None,
                 on_start: Callable[[], None] | None = None) -> None:
        if config.max_steps is None:
            raise ValueError("TrainConfig.max_steps is not set: the command derives it before training")
        self.config, self.tokenizer, self.out_dir = config, tokenizer, Path(out_dir)
        self.sample = config.sample_prompt if sample is None else sample
        self.seq_len, self.base_model, self.adapters_only = seq_len, base_model, adapters_only
        self.files = files or (lambda model: {})
        self.on_start = on_start
        self.dist = dist_info or Distributed()
        self.device = device or default_device(self.dist)
        self.train_batches, self.eval_batches, self.eval_metrics = train_batches, eval_batches, eval_metrics
        self.benchmarks = benchmarks
        if benchmarks is not None and config.fsdp:  # FSDP gathers the weights only inside the training step
            raise ValueError("benchmarks need the whole model in each process; FSDP shards it")
        self.evaluates = eval_batches is not None or benchmarks is not None
        self.run_identity = json.loads(json.dumps(run_identity))  # as a checkpoint holds it: tuples become lists
        self.model = model.to(self.device)
        self.autocast_dtype = autocast_dtype(config.dtype, self.device)
        self.objective = objective or TokenLoss()
        self.loss_module: nn.Module = LossOf(self.model, self.objective)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if config.fsdp:
            from torch.distributed.fsdp import fully_shard
            for block in self.model.layers:
                fully_shard(block)
            fully_shard(self.loss_module)
        elif self.dist.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.loss_module = self.ddp
        if config.compile:
            self.loss_module = torch.compile(self.loss_module)
        self.optimizer = build_optimizer(self.model, config)
        self.step, self.tokens_seen = 0, 0
        self._stop_requested: int = 0  # the signal that asked the run to stop, 0 before one came
        self._saved_step: int | None = None

    # --- state ---------------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from the run folder's latest checkpoint; False when there is none (the metrics of a
        run stopped before its first checkpoint are dropped then: the run starts anew)."""
        folder = checkpoint.latest_checkpoint(self.out_dir)
        if folder is None:
            if self.dist.is_main:
                self._truncate_metrics(keep_through=-1)
            return False
        saved = checkpoint.load_training_checkpoint(folder)
        checkpoint.check_same_run(folder, saved.state["run_identity"], self.run_identity)
        checkpoint.restore_training_state(self.model, self.optimizer, saved.weights, saved.optimizer,
                                          fsdp=self.config.fsdp)
        self.step, self.tokens_seen = saved.state["step"], saved.state["tokens_seen"]
        self._saved_step = self.step  # a stop before the next step has nothing new to save
        self.train_batches.load_state_dict(saved.state["data"])
        checkpoint.set_rng_state(saved.rng)
        if self.dist.is_main:
            self._truncate_metrics(keep_through=self.step)
        return True

    def save(self) -> None:
        """Write a checkpoint of the current step (on rank 0; with FSDP every rank helps gather)."""
        weights, optimizer = checkpoint.training_state(self.model, self.optimizer, fsdp=self.config.fsdp)
        adapter_config = lora.adapter_config(self.model)
        if adapter_config:
            adapter_config["base_model"] = self.base_model
        if self.dist.is_main:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "run_identity": self.run_identity,
                     "data": self.train_batches.state_dict()}
            try:
                checkpoint.save_training_checkpoint(
                    self.out_dir, self.step, self.model.config, None if self.adapters_only else weights,
                    self.tokenizer, optimizer, state, keep_last=self.config.keep_last,
                    adapters=lora.adapter_state_dict(self.model) or None, adapter_config=adapter_config,
                    files=self.files(self.model))
            except OSError as error:
                raise self._resumable(error) from None
        self._saved_step = self.step

    # --- logging -------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            try:
                append_line(self.out_dir / "metrics.jsonl", json.dumps(record))
            except OSError as error:
                raise self._resumable(error) from None

    def _resumable(self, error: OSError) -> OSError:
        """A full disk's error, told how to go on: the run continues with --resume once there is room."""
        if not is_disk_full(error):
            return error
        kept = checkpoint.latest_checkpoint(self.out_dir)
        where = f"from {kept.name}, the last checkpoint, which is intact" if kept else "from the start"
        return OSError(error.errno, f"{error.strerror}, then rerun with --resume: it continues {where}")

    def _truncate_metrics(self, keep_through: int) -> None:
        """Forget metrics written after the checkpoint we resume from, so no step appears twice (and a
        last line that a crash or a full disk tore)."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            records, _ = read_jsonl(path)
            write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= keep_through))

    # --- training ------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches, queued on the device without waiting for it.

        Returns the step's loss (mean per counted token), grad_norm and counted (tokens in the loss, all
        ranks) as device tensors, which fit() reads back every log_every steps, and its lr and tokens (this
        process's inputs) as numbers. A step whose loss or gradient norm is not finite, or that counts no
        token (its loss is 0 / 0), leaves the weights and the optimizer as they were.
        """
        batches = [next(self.train_batches).to(self.device) for _ in range(self.config.grad_accum)]
        counted = self.dist.sum(torch.stack([torch.as_tensor(self.objective.count(b), device=self.device)
                                             for b in batches]).sum().float())
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # DDP all-reduces gradients only after the last micro-batch of the step
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with self._autocast():
                    loss_sum, sums = self.loss_module(batch)
                # DDP averages gradients over ranks; scaling by world_size turns that into a sum
                (loss_sum * (self.dist.world_size / counted)).backward()
            total += loss_sum.detach()
            add_sums(metric_sums, sums)
        loss = self.dist.sum(total) / counted
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the norm over all shards
            grad_norm = grad_norm.full_tensor()
        self._optimizer_step(skip=~(torch.isfinite(loss) & torch.isfinite(grad_norm)))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss, "grad_norm": grad_norm, "counted": counted, "lr": lr,
                "tokens": sum(b.input_ids.numel() for b in batches), "metrics": self._means(metric_sums, counted)}

    def _means(self, sums: dict[str, torch.Tensor], counted: torch.Tensor) -> dict[str, torch.Tensor]:
        """An objective's summed metrics as means per unit of the step (or evaluation), over all ranks,
        on the device."""
        return {name: self.dist.sum(value) / counted for name, value in sorted(sums.items())}

    def _optimizer_step(self, skip: torch.Tensor) -> None:
        """The AdamW update, unless `skip` (a bool on the device) is set, decided without a read-back.

        The fused AdamW takes a found_inf flag, the one GradScaler sets after an overflow: where it is 1,
        the kernel changes no parameter and no moment, and the step count is put back. An optimizer
        that is not fused (on an unusual device) cannot, so there the flag is read.
        """
        if self.optimizer.param_groups[0]["fused"]:
            self.optimizer.found_inf = skip.float()
            try:
                with _implicit_replication(self.config.fsdp):
                    self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not skip.item():
            self.optimizer.step()

    def _read_back(self, pending: list[dict[str, Any]], bar: tqdm, flops_per_token: float,
                   peak: float | None) -> None:
        """Read the pending steps' numbers from the device, in one copy (the one wait on the device in
        log_every steps), log a record per step, and stop the run at the first step that went wrong."""
        names = sorted(pending[0]["metrics"])  # an objective's own metrics (DPO's, say), in the same copy
        numbers = torch.stack([torch.stack([p["loss"], p["grad_norm"].float(), p["counted"],
                                            *(p["metrics"][name].float() for name in names)]) for p in pending])
        tokens = self.dist.sum(torch.tensor([p["tokens"] for p in pending], device=self.device))
        numbers, tokens = numbers.tolist(), tokens.tolist()
        metrics = [dict(zip(names, row[3:])) for row in numbers]
        numbers = [row[:3] for row in numbers]
        now = time.perf_counter()
        tokens_per_s = sum(tokens) / max(now - self._window_start, 1e-9)
        self._window_start = now
        first = self.step - len(pending) + 1
        for step, p, (loss, grad_norm, counted), step_tokens, metrics in zip(
                range(first, self.step + 1), pending, numbers, tokens, metrics):
            if counted == 0:
                raise TrainingStopped(f"step {step} has no counted tokens: every loss_mask is empty")
            if not math.isfinite(loss):
                raise _stopped("loss", loss, step, self.out_dir, updates=step - 1, objective=self.objective)
            if not math.isfinite(grad_norm):
                raise _stopped("gradient norm", grad_norm, step, self.out_dir, updates=step - 1,
                               objective=self.objective)
            self.tokens_seen += step_tokens
            record = {"step": step, "loss": loss, "lr": p["lr"], "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_s, "tokens_seen": self.tokens_seen, **metrics}
            if peak:
                record["mfu"] = flops_per_token * tokens_per_s / (peak * self.dist.world_size)
            self._log(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{p['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                        **({"mfu": f"{100 * record['mfu']:.1f}%"} if peak else {}))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Masked loss and perplexity over the fixed validation batches (eval_metrics' numbers instead,
        its loss among them, when it is given), the benchmarks' scores, and a sample."""
        self.model.eval()
        record: dict[str, Any] = {"step": self.step}
        if self.eval_batches is not None and self.eval_metrics is not None:
            with self._autocast():
                record.update(self.eval_metrics(self.model, (batch.to(self.device) for batch in self.eval_batches())))
        elif self.eval_batches is not None:
            total = torch.zeros((), device=self.device)
            counted = torch.zeros((), device=self.device)
            metric_sums: dict[str, torch.Tensor] = {}
            for batch in self.eval_batches():
                batch = batch.to(self.device)
                with self._autocast():
                    loss_sum, sums = self.loss_module(batch)
                total += loss_sum.float()
                add_sums(metric_sums, sums)
                counted += self.objective.count(batch)
            total, counted = self.dist.sum(total), self.dist.sum(counted)
            if counted.item():
                record["val_loss"] = (total / counted).item()
                record.update({f"val_{name}": value.item() for name, value in self._means(metric_sums, counted).items()})
        if "val_loss" in record and self.eval_metrics is None and getattr(self.objective, "perplexity", True):
            record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
        broken = not math.isfinite(record.get("val_loss", 0.0))  # sampling from NaN logits would fail
        if self.benchmarks is not None and not broken:
            with self._autocast():
                record.update(self.benchmarks(self.model))
        if self.sample and self.dist.is_main and not self.config.fsdp and not broken:
            from .generation import stream
            record["sample"] = "".join(stream(self.model, self.tokenizer, self.sample,
                                              max_tokens=self.config.sample_tokens, temperature=0.8, top_k=50,
                                              seed=self.config.seed))
        self.model.train()
        return record

    def fit(self) -> None:
        """Train to max_steps, evaluating and saving on schedule; Ctrl-C saves and stops cleanly."""
        c = self.config
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.on_start is not None:
                self.on_start()
        self.model.train()
        flops_per_token = self.model.flops_per_token(self.seq_len or self.model.config.max_seq_len)
        peak = peak_flops(self.device)
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not self.dist.is_main, desc="training",
                   dynamic_ncols=True)
        previous_handlers = {number: signal.signal(number, self._request_stop) for number in STOP_SIGNALS}
        try:
            if self.dist.is_main and c.warmup_steps >= c.max_steps > self.step:
                bar.write(f"warning: --warmup-steps {c.warmup_steps} is not below the run's {c.max_steps} steps, so the "
                          f"learning rate never reaches --lr {c.lr:g}; lower --warmup-steps", file=sys.stderr)
            if self.step == 0 and self.evaluates and not c.no_initial_eval:  # every curve's baseline
                self._log_evaluation(bar)
            pending: list[dict[str, Any]] = []  # the steps not yet read back from the device
            self._window_start = time.perf_counter()
            while self.step < c.max_steps and not self._stop_requested:
                pending.append(self.train_step())
                bar.update(1)
                done = self.step == c.max_steps
                evaluate = self.evaluates and (done or (c.eval_every and self.step % c.eval_every == 0))
                save = done or (c.save_every and self.step % c.save_every == 0)
                if evaluate or save or self._stop_requested or self.step % max(1, c.log_every) == 0:
                    self._read_back(pending, bar, flops_per_token, peak)  # stops here if a step went wrong
                    pending = []
                if evaluate:
                    self._log_evaluation(bar)
                if save:
                    self.save()
                if evaluate or save:  # their time is not training time
                    self._window_start = time.perf_counter()
            if pending:  # Ctrl-C came between a step and its read-back
                self._read_back(pending, bar, flops_per_token, peak)
            if self._stop_requested and self._saved_step != self.step:  # not just saved on schedule
                if self.dist.is_main:
                    bar.write(f"{STOP_SIGNALS[self._stop_requested]}: saving step {self.step} to {self.out_dir}",
                              file=sys.stderr)
                self.save()
        finally:
            for number, handler in previous_handlers.items():
                signal.signal(number, handler)
            bar.close()

    def _log_evaluation(self, bar: tqdm) -> None:
        evaluation = self.evaluate()
        self._log(evaluation)
        if not math.isfinite(evaluation.get("val_loss", 0.0)):
            raise _stopped("validation loss", evaluation["val_loss"], self.step, self.out_dir, updates=self.step,
                           objective=self.objective)
        if "val_loss" in evaluation and self.dist.is_main:
            extra = "".join(f", {name.removeprefix('val_')} {value:.4f}" for name, value in evaluation.items()
                            if name.startswith("val_") and name not in ("val_loss", "val_ppl"))
            perplexity = f", perplexity {evaluation['val_ppl']:.2f}" if "val_ppl" in evaluation else ""
            bar.write(f"step {self.step}: val loss {evaluation['val_loss']:.4f}{perplexity}{extra}", file=sys.stderr)
        if self.benchmarks is not None and self.dist.is_main:  # scored: a broken model stopped the run above
            scores = {name: value for name, value in evaluation.items()
                      if name not in ("step", "sample") and not name.startswith("val_")}
            bar.write(f"step {self.step}: {self.benchmarks.summary(scores)}", file=sys.stderr)

    def _request_stop(self, signum, frame) -> None:
        """First Ctrl-C or SIGTERM: finish the current step, save, stop. A second one stops at once."""
        if self._stop_requested:
            raise SecondInterrupt("the last checkpoint is intact" if _kept(self.out_dir)
                                  else f"{self.out_dir} holds no checkpoint yet")
        self._stop_requested = signum
