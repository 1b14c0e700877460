"""Batch: the one type every loss in the project consumes, and `collate`, which pads examples into one.

Pretraining windows, SFT examples (padded or packed), classification examples and preference pairs
all become a Batch; the model's loss is the cross-entropy at the positions where loss_mask counts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

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
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                         for f in dataclasses.fields(self)})

    @property
    def num_counted(self) -> int:
        """Positions whose targets count in the loss."""
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
