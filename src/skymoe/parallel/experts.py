"""Expert parallelism: this rank's experts, fed through an all-to-all token dispatcher.

``ParallelExperts`` replaces a block's ``SwiGLUExperts`` with the same call signature, so the
router, capacity and drop decisions, balance losses and metrics of ``MoEBlock`` run unchanged
(and identically on every rank that holds the same tokens). Per forward:

1. with ETP = 1 and TP > 1, each TP rank keeps its share of the group's (replicated) tokens;
2. the assignments are sorted by expert (``dispatch_sorted``; dropped ones never leave);
3. per-expert counts are exchanged over the EP group, then the rows travel with one
   variable-split ``all_to_all_single``;
4. received rows are regrouped by local expert and run through the grouped SwiGLU (with ETP,
   each rank holds a slice of every expert's intermediate size: partial outputs are summed
   over the ETP group);
5. outputs travel back the same way, are weighted and summed over the k choices, and, when
   tokens were split in step 1, gathered over the TP group.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..model.moe import swiglu, dispatch_sorted, grouped_linear
from .comm import CommGroup, all_to_all, copy_to, exchange_counts, gather_rows, reduce_from, \
    split_rows
from .layout import split_sizes


def source_to_expert_order(counts_SE: torch.Tensor) -> torch.Tensor:
    """Row order that regroups received rows from [source][expert] blocks (``counts_SE[s, e]``
    rows each, source-major) into [expert][source] blocks."""
    lengths = counts_SE.reshape(-1)
    starts_SE = (lengths.cumsum(0) - lengths).view_as(counts_SE)
    lengths_ES, starts_ES = counts_SE.t().reshape(-1), starts_SE.t().reshape(-1)
    block_begin = lengths_ES.cumsum(0) - lengths_ES
    offset = torch.repeat_interleave(starts_ES - block_begin, lengths_ES)
    return offset + torch.arange(int(lengths.sum()), device=counts_SE.device)


class ParallelExperts(nn.Module):
    """The experts ``[first_expert, first_expert + w13.shape[0])`` of a block with
    ``num_experts`` experts, reached through all-to-all over ``ep``; with ``etp`` active each
    holds a slice of the intermediate size. ``token_group`` splits the tokens before dispatch
    (the TP group when ETP = 1; a one-rank group otherwise)."""

    def __init__(self, w13: nn.Parameter, w2: nn.Parameter, num_experts: int, ep: CommGroup,
                 etp: CommGroup, token_group: CommGroup) -> None:
        super().__init__()
        self.w13, self.w2 = w13, w2
        self.num_experts = num_experts
        self.ep, self.etp, self.token_group = ep, etp, token_group

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        group = self.token_group
        if group.active:
            sizes = split_sizes(x_TH.shape[0], group.size)
            start = sum(sizes[:group.rank])
            rows = slice(start, start + sizes[group.rank])
            x_TH, weights_TK = split_rows(x_TH, sizes, group), split_rows(weights_TK, sizes, group)
            expert_ids_TK = expert_ids_TK[rows]
            keep_TK = keep_TK[rows] if keep_TK is not None else None
        y_TH = dispatch_sorted(x_TH, expert_ids_TK, weights_TK, self.num_experts, self._ffn,
                               keep_TK)
        return gather_rows(y_TH, sizes, group) if group.active else y_TH

    def _ffn(self, x_SH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by (global) expert in, outputs in the same order out."""
        if torch.is_autocast_enabled(x_SH.device.type):  # send what the GEMMs will read
            x_SH = x_SH.to(torch.get_autocast_dtype(x_SH.device.type))
        return exchange(x_SH, counts, self.ep, self._local_experts)

    def _local_experts(self, x_SH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        h = copy_to(x_SH, self.etp)
        h = grouped_linear(swiglu(grouped_linear(h, self.w13, counts)), self.w2, counts)
        return reduce_from(h, self.etp)


def exchange(x_SH: torch.Tensor, counts: list[int], ep: CommGroup,
             local_fn: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
    """The all-to-all round trip: rows sorted by global expert (``counts[e]`` rows for expert
    e, experts split evenly over ``ep`` in rank order) go to their expert's rank, where
    ``local_fn(rows, local_counts)`` runs on them grouped by local expert; the results come back
    in the original order. Differentiable."""
    counts_RE = torch.tensor(counts, dtype=torch.long).view(ep.size, -1)
    received_SE = exchange_counts(counts_RE, ep)
    sent, got = counts_RE.sum(1).tolist(), received_SE.sum(1).tolist()
    x_recv = all_to_all(x_SH, got, sent, ep)
    order = source_to_expert_order(received_SE).to(x_SH.device)
    y = local_fn(x_recv[order], received_SE.sum(0).tolist())
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return all_to_all(y[inverse], sent, got, ep)
