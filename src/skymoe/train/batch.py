"""A training batch: token ids, and for fine-tuning data the loss mask and packed positions.

Pretraining rows are their own labels (every next token is predicted). Supervised fine-tuning
rows carry ``labels`` with -100 where no loss is taken (prompts, padding) and, when several
samples are packed into a row, ``position_ids`` restarting at 0 for each sample (the model then
keeps attention within each sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.loss import IGNORE_INDEX, label_count


@dataclass
class Batch:
    """Rows ``[B, T]``: ``input_ids``; ``labels`` (None: the inputs themselves); and
    ``position_ids`` (None: 0 .. T-1 in every row)."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, rows: "torch.Tensor | Batch") -> "Batch":
        """A batch from plain token rows (their own labels), or ``rows`` if it is one."""
        return rows if isinstance(rows, Batch) else cls(rows)

    @classmethod
    def isolated_documents(cls, ids_BT: torch.Tensor, eos_id: int) -> "Batch":
        """Rows of documents packed one after the other (each ending with ``eos_id``) as a
        batch that keeps them apart: positions restart after every EOS (so attention stays
        within each document) and a document's first token is not predicted from the one
        before (its label is -100)."""
        b, t = ids_BT.shape
        starts = torch.zeros_like(ids_BT, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = ids_BT[:, :-1] == eos_id
        index = torch.arange(t, device=ids_BT.device).expand(b, t)
        first = torch.where(starts, index, 0).cummax(dim=1).values
        return cls(ids_BT, ids_BT.masked_fill(starts, IGNORE_INDEX), index - first)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target(self) -> torch.Tensor:
        """The labels the loss compares with (shifted inside the loss)."""
        return self.input_ids if self.labels is None else self.labels

    def label_tokens(self) -> int:
        """How many next-token predictions the batch's loss averages over."""
        if self.labels is None:
            return self.input_ids.shape[0] * max(self.input_ids.shape[1] - 1, 0)
        return label_count(self.labels)

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(*(t[start:stop] if t is not None else None for t in self._tensors()))

    def split(self, size: int) -> list["Batch"]:
        """Consecutive batches of ``size`` rows (the last may be smaller)."""
        return [self.rows(i, i + size) for i in range(0, len(self), size)]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) if t is not None else None for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.input_ids, self.labels, self.position_ids


__all__ = ["Batch"]
