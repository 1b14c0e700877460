"""The AdamW step that llama.trainer builds (fused) against torch's default (foreach), on one model.

Full fine-tuning at a small batch on a CPU spends much of each step in the optimizer: it reads and
writes every parameter, gradient and both moments. Both optimizers get the same parameter groups
(build_optimizer's) and the same gradients, and alternate in one process; after the timing, one step
of each from the same state must give the same parameters, to float rounding.

    python benchmarks/optimizer_step.py                      # SmolLM2-135M's shape, 134.5M parameters
    python benchmarks/optimizer_step.py --preset small
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from llama import Llama, LlamaConfig
from llama.trainer import TrainConfig, build_optimizer


def foreach_twin(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """torch's default AdamW over `optimizer`'s parameter groups and settings, not fused."""
    groups = [{"params": group["params"], "weight_decay": group["weight_decay"]} for group in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=optimizer.defaults["lr"], betas=optimizer.defaults["betas"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m", help="model preset (default: smollm2-135m)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per measurement (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the parameters live (default: cuda when there is one, else cpu)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset(args.preset)).to(args.device)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    config = TrainConfig(max_steps=1)
    ours = build_optimizer(model, config)
    default = foreach_twin(ours)
    assert ours.defaults["fused"] and not default.defaults["fused"]

    def seconds_per_step(optimizer: torch.optim.Optimizer) -> float:
        optimizer.step()  # moments allocated outside the timing
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    print(f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters on {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    fused, foreach = [], []
    for round_number in range(args.rounds):
        fused.append(seconds_per_step(ours))
        foreach.append(seconds_per_step(default))
        print(f"round {round_number + 1}: fused {fused[-1]:.3f} s, foreach {foreach[-1]:.3f} s")
    print(f"median: fused (build_optimizer) {statistics.median(fused):.3f} s per step, "
          f"foreach (torch's default) {statistics.median(foreach):.3f} s: "
          f"fused is {statistics.median(foreach) / statistics.median(fused):.2f}x faster")

    # the speed is worth nothing if the update differs: one more step of each from one state
    clone = copy.deepcopy(model)
    for param, twin in zip(model.parameters(), clone.parameters()):
        twin.grad = param.grad.clone()  # deepcopy leaves gradients behind
    fused_step = build_optimizer(model, config)
    foreach_step = foreach_twin(build_optimizer(clone, config))
    fused_step.step()
    foreach_step.step()
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), clone.parameters()))
    print(f"largest parameter difference after one step from the same state: {gap:.2e}")
    assert gap < 1e-6, "fused and foreach AdamW disagree"


if __name__ == "__main__":
    main()
