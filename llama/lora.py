"""LoRA: train a low-rank update of the attention and MLP projections instead of all the weights.

Each adapted projection keeps its pretrained weight W frozen and learns y = x W^T + (alpha / r) x A^T B^T
with A [r, in] and B [out, r]. B starts at zero, so training starts from the pretrained model exactly.
Merging folds the update into W, giving a plain model with the original parameter names.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .model import Llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """A bias-free nn.Linear with a frozen `weight` and trainable `lora_a`, `lora_b`."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA paper

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged_weight(self) -> Tensor:
        return self.weight + (self.lora_b @ self.lora_a).to(self.weight.dtype) * self.scale


def apply_lora(model: Llama, rank: int, alpha: float | None = None, targets: tuple[str, ...] = TARGETS) -> Llama:
    """Swap the target projections for LoRALinear and freeze everything else. alpha defaults to 2 * rank."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    check_rank(model, rank, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in targets:
                    setattr(parent, name, LoRALinear(child, rank, alpha if alpha is not None else 2.0 * rank))
    return model


def check_rank(model: Llama, rank: int, targets: tuple[str, ...] = TARGETS) -> None:
    """Refuse a rank above the smallest side of an adapted weight: beyond it the update is no longer
    low-rank, only larger than the weight itself."""
    sizes = {name: min(child.in_features, child.out_features) for block in model.layers
             for parent in (block.self_attn, block.mlp) for name, child in parent.named_children() if name in targets}
    smallest = min(sizes, key=sizes.get, default=None)
    if smallest is not None and rank > sizes[smallest]:
        raise ValueError(f"LoRA rank {rank} is above the smallest side of the adapted {smallest} weights "
                         f"({sizes[smallest]}); pass a --lora-rank of at most {sizes[smallest]}")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_config(model: nn.Module) -> dict[str, object] | None:
    """Rank, alpha and targets of the model's adapters (None without adapters): enough to re-apply them."""
    modules = lora_modules(model)
    if not modules:
        return None
    first = next(iter(modules.values()))
    return {"rank": first.rank, "alpha": first.alpha,
            "targets": sorted({name.rpartition(".")[2] for name in modules}, key=TARGETS.index)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Just the adapters' weights: what --save-adapter-only writes and LoRA resume reads."""
    return {f"{name}.{part}": getattr(m, part).detach()
            for name, m in lora_modules(model).items() for part in ("lora_a", "lora_b")}


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights of the equivalent plain model (original names, updates folded in), without changing `model`."""
    modules = lora_modules(model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner, _, part = name.rpartition(".")
        if owner in modules:
            if part == "weight":
                state[name] = modules[owner].merged_weight().detach()
        else:
            state[name] = tensor
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight, in place."""
    for name, module in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(module.merged_weight().detach())
        setattr(model.get_submodule(parent_name), child, linear)
    return model
