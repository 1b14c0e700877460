"""Batch: the one type every loss in the project consumes, and `collate`, which pads examples into one.

Pretraining windows, SFT examples (padded or packed), classification examples and preference pairs
all become a Batch; the model's loss is the cross-entropy at the positions where loss_mask counts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass
class Batch:
    """A batch for masked next-token (or label) training.

    input_ids, targets: [B, T] token ids; targets[b, t] is what position t should predict.
    loss_mask: [B, T] bool, True where the target counts (pretraining: everywhere; SFT: responses).
    doc_ids: [B, T], set when several documents are packed into one row, so attention stays inside
    each document.
    """

    input_ids: Tensor
    targets: Tensor
    loss_mask: Tensor
    doc_ids: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device`. From the CPU to a GPU the copy goes through pinned memory and does not
        wait: it overlaps the GPU's work on what was queued before."""
        device = torch.device(device)
        pinned = device.type == "cuda"

        def move(tensor: Tensor | None) -> Tensor | None:
            if not isinstance(tensor, Tensor):  # None, or what a subclass keeps on the host
                return tensor
            if pinned and tensor.device.type == "cpu":
                return tensor.pin_memory().to(device, non_blocking=True)
            return tensor.to(device)

        return type(self)(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @property
    def num_counted(self) -> int:
        """Positions whose targets count in the loss (a read from the device: not for the training loop,
        which keeps its count on the device)."""
        return int(self.loss_mask.sum())

    def attn_mask(self) -> Tensor | None:
        """Causal attention within each packed document, [B, T, T]; None when nothing is packed."""
        if self.doc_ids is None:
            return None
        T = self.input_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.input_ids.device).tril()
        return causal & (self.doc_ids[:, :, None] == self.doc_ids[:, None, :])


def collate(examples: Sequence[Mapping[str, Tensor]], pad_id: int = 0) -> Batch:
    """Right-pad to the longest example in the batch. Pads never count, and in packed rows form document -1."""
    length = max(len(example["input_ids"]) for example in examples)

    def stack(key: str, fill: int | bool) -> Tensor:
        out = torch.full((len(examples), length), fill, dtype=examples[0][key].dtype)
        for row, example in enumerate(examples):
            out[row, :len(example[key])] = example[key]
        return out

    return Batch(stack("input_ids", pad_id), stack("targets", pad_id), stack("loss_mask", False),
                 stack("doc_ids", -1) if "doc_ids" in examples[0] else None)



def check_token_ids(ids: Iterable[Tensor | np.ndarray | Sequence[int]], vocab_size: int, what: str, fix: str) -> None:
    """Fail with one line naming `what` and `fix` when any id lies outside [0, vocab_size).

    Training data is checked here, on the CPU, where its batches are made: the model checks ids only
    outside training, since on a GPU each check would wait for the device (Llama._checks_values).
    """
    low, high = 0, -1
    for row in ids:
        row = np.asarray(row)
        if row.size:
            low, high = min(low, int(row.min())), max(high, int(row.max()))
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} holds token id {low if low < 0 else high}, out of range for vocab_size "
                         f"{vocab_size} (ids must be in [0, {vocab_size - 1}]); {fix}")
