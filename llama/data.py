"""Training data: the one Batch type every loss in the project consumes."""
from __future__ import annotations

import dataclasses

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
