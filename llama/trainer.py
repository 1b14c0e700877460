"""The training loop shared by train.py (pretraining) and finetune.py (SFT, classification): one loop, not copies.

What it takes care of, so that the scripts don't have to:
- AdamW without decay on norms and embeddings; linear warmup, then cosine decay to min_lr; clipping.
- Gradient accumulation that weighs every counted token equally: each micro-batch's summed loss is
  divided by the number of counted tokens in the whole optimizer step (on all ranks together).
- bf16 autocast on CUDA, optional torch.compile, DDP or FSDP2 under torchrun.
- A tqdm bar (loss, lr, tokens/s, MFU on a GPU) and metrics.jsonl; evaluation with perplexity and a
  sample; atomic checkpoints that keep the last K; exact resume; Ctrl-C saves before it stops; a
  NaN or inf loss stops the run and leaves the last good checkpoint alone.
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
from .model import Llama
from .tokenizer import Tokenizer

# Dense bf16 peak FLOP/s by GPU name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@dataclasses.dataclass
class TrainConfig:
    max_steps: int
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    keep_last: int = 3
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, float32 on CPU
    compile: bool = False
    fsdp: bool = False
    seed: int = 0
    sample_prompt: str | list[int] | None = None  # text (gets BOT) or ready ids, answered at each evaluation
    save_adapter_only: bool = False  # LoRA runs: checkpoints hold adapters, not merged weights
    sample_tokens: int = 48
    initial_eval: bool = True  # evaluate at step 0 too, the baseline every validation curve starts from
    seq_len: int | None = None  # positions per training row, for the FLOP count (None: the model's max_seq_len)
    base_model: str | None = None  # where a LoRA run's frozen base came from, for its adapter_config.json


class TrainingStopped(RuntimeError):
    """The run cannot go on (a NaN loss, say); the last good checkpoint is intact."""


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


class LossOf(nn.Module):
    """Puts Llama.loss behind forward(), where DDP and FSDP hook in."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model.loss(batch.input_ids, batch.targets, batch.loss_mask, attn_mask=batch.attn_mask(),
                               reduction="sum")


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


def default_device(dist_info: Distributed) -> torch.device:
    return torch.device(f"cuda:{dist_info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


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
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, train_batches: Iterator[Batch],
                 eval_batches: Callable[[], Iterable[Batch]] | None, config: TrainConfig, out_dir: str | Path,
                 run_identity: dict[str, Any], dist_info: Distributed | None = None,
                 device: torch.device | None = None,
                 eval_metrics: Callable[[Llama, Iterable[Batch]], dict[str, float]] | None = None) -> None:
        self.config, self.tokenizer, self.out_dir = config, tokenizer, Path(out_dir)
        self.dist = dist_info or Distributed()
        self.device = device or default_device(self.dist)
        self.train_batches, self.eval_batches, self.eval_metrics = train_batches, eval_batches, eval_metrics
        self.run_identity = json.loads(json.dumps(run_identity))  # as a checkpoint holds it: tuples become lists
        self.model = model.to(self.device)
        self.autocast_dtype = (torch.bfloat16 if config.dtype == "auto" and self.device.type == "cuda"
                               else None if config.dtype in ("auto", "float32") else getattr(torch, config.dtype))
        self.loss_module: nn.Module = LossOf(self.model)
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
        self._stop_requested = False

    # --- state ---------------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from the run folder's latest checkpoint; False when there is none."""
        folder = checkpoint.latest_checkpoint(self.out_dir)
        if folder is None:
            return False
        saved = checkpoint.load_training_checkpoint(folder)
        identity = saved.state["run_identity"]
        changed = sorted(k for k in set(identity) | set(self.run_identity) if identity.get(k) != self.run_identity.get(k))
        if changed:
            details = ", ".join(f"{k}: {identity.get(k)!r} -> {self.run_identity.get(k)!r}" for k in changed)
            raise ValueError(f"cannot resume {folder}: it was made with other settings ({details}); "
                             "use the same settings, or a new --out")
        checkpoint.restore_training_state(self.model, self.optimizer, saved.weights, saved.optimizer,
                                          fsdp=self.config.fsdp)
        self.step, self.tokens_seen = saved.state["step"], saved.state["tokens_seen"]
        self.train_batches.load_state_dict(saved.state["data"])
        checkpoint.set_rng_state(saved.rng)
        if self.dist.is_main:
            self._truncate_metrics()
        return True

    def save(self) -> None:
        """Write a checkpoint of the current step (on rank 0; with FSDP every rank helps gather)."""
        weights, optimizer = checkpoint.training_state(self.model, self.optimizer, fsdp=self.config.fsdp)
        adapter_config = lora.adapter_config(self.model)
        if adapter_config:
            adapter_config["base_model"] = self.config.base_model
        if self.dist.is_main:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "run_identity": self.run_identity,
                     "data": self.train_batches.state_dict()}
            checkpoint.save_training_checkpoint(
                self.out_dir, self.step, self.model.config, None if self.config.save_adapter_only else weights,
                self.tokenizer, optimizer, state, keep_last=self.config.keep_last,
                adapters=lora.adapter_state_dict(self.model) or None, adapter_config=adapter_config,
                labels=getattr(self.model, "labels", None))

    # --- logging -------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """Forget metrics written after the checkpoint we resume from, so no step appears twice."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))

    # --- training ------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's mean loss and stats."""
        batches = [next(self.train_batches).to(self.device) for _ in range(self.config.grad_accum)]
        counted = self.dist.sum(torch.tensor(float(sum(b.num_counted for b in batches)), device=self.device))
        if counted.item() == 0:
            raise TrainingStopped(f"step {self.step + 1} has no counted tokens: every loss_mask is empty")
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # DDP all-reduces gradients only after the last micro-batch of the step
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with self._autocast():
                    loss_sum = self.loss_module(batch)
                # DDP averages gradients over ranks; scaling by world_size turns that into a sum
                (loss_sum * (self.dist.world_size / counted)).backward()
            total += loss_sum.detach()
        loss = (self.dist.sum(total) / counted).item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(f"the loss became {loss} at step {self.step + 1}; stopping without saving, "
                                  f"the last good checkpoint in {self.out_dir} is intact (try a lower --lr)")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = int(self.dist.sum(torch.tensor(sum(b.input_ids.numel() for b in batches), device=self.device)))
        self.tokens_seen += tokens
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "counted": int(counted)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Masked loss and perplexity over the fixed validation batches (eval_metrics' numbers instead,
        its loss among them, when it is given), and a sample."""
        self.model.eval()
        record: dict[str, Any] = {"step": self.step}
        if self.eval_metrics is not None:
            with self._autocast():
                record.update(self.eval_metrics(self.model, (batch.to(self.device) for batch in self.eval_batches())))
        else:
            total = torch.zeros((), device=self.device)
            counted = torch.zeros((), device=self.device)
            for batch in self.eval_batches():
                batch = batch.to(self.device)
                with self._autocast():
                    total += self.loss_module(batch).float()
                counted += batch.num_counted
            total, counted = self.dist.sum(total), self.dist.sum(counted)
            if counted.item():
                record["val_loss"] = (total / counted).item()
        if "val_loss" in record and self.eval_metrics is None:  # a perplexity only of the LM's own loss
            record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
        if self.config.sample_prompt and self.dist.is_main and not self.config.fsdp:
            from .generation import stream
            record["sample"] = "".join(stream(self.model, self.tokenizer, self.config.sample_prompt,
                                              max_tokens=self.config.sample_tokens, temperature=0.8, top_k=50,
                                              seed=self.config.seed))
        self.model.train()
        return record

    def fit(self) -> None:
        """Train to max_steps, evaluating and saving on schedule; Ctrl-C saves and stops cleanly."""
        c = self.config
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        flops_per_token = self.model.flops_per_token(c.seq_len or self.model.config.max_seq_len)
        peak = peak_flops(self.device)
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not self.dist.is_main, desc="training",
                   dynamic_ncols=True)
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        try:
            if self.dist.is_main and c.warmup_steps >= c.max_steps > self.step:
                bar.write(f"warning: --warmup-steps {c.warmup_steps} is not below the run's {c.max_steps} steps, so the "
                          f"learning rate never reaches --lr {c.lr:g}; lower --warmup-steps", file=sys.stderr)
            if self.step == 0 and self.eval_batches is not None and c.initial_eval:  # every curve's baseline
                self._log_evaluation(bar)
            while self.step < c.max_steps and not self._stop_requested:
                start = time.perf_counter()
                stats = self.train_step()
                elapsed = time.perf_counter() - start
                tokens_per_s = stats["tokens"] / elapsed
                record = {"step": self.step, "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                          "tokens_per_s": tokens_per_s, "tokens_seen": self.tokens_seen}
                if peak:
                    record["mfu"] = flops_per_token * tokens_per_s / (peak * self.dist.world_size)
                self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                **({"mfu": f"{100 * record['mfu']:.1f}%"} if peak else {}))
                done = self.step == c.max_steps
                if self.eval_batches is not None and (done or (c.eval_every and self.step % c.eval_every == 0)):
                    self._log_evaluation(bar)
                if done or (c.save_every and self.step % c.save_every == 0):
                    self.save()
            if self._stop_requested:
                if self.dist.is_main:
                    bar.write(f"interrupted: saving step {self.step} to {self.out_dir}", file=sys.stderr)
                self.save()
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            bar.close()

    def _log_evaluation(self, bar: tqdm) -> None:
        evaluation = self.evaluate()
        self._log(evaluation)
        if "val_loss" in evaluation and self.dist.is_main:
            extra = "".join(f", {name.removeprefix('val_')} {value:.4f}" for name, value in evaluation.items()
                            if name.startswith("val_") and name not in ("val_loss", "val_ppl"))
            perplexity = f", perplexity {evaluation['val_ppl']:.2f}" if "val_ppl" in evaluation else ""
            bar.write(f"step {self.step}: val loss {evaluation['val_loss']:.4f}{perplexity}{extra}", file=sys.stderr)

    def _request_stop(self, signum, frame) -> None:
        """First Ctrl-C: finish the current step, save, stop. A second one stops at once."""
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
