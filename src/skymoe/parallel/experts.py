"""Expert parallelism: this rank's experts, fed through an all-to-all token dispatcher.

``ExpertParallel`` is attached to a block's experts module (``experts.parallel``), whose
forward then goes through it; the router, capacity and drop decisions, balance losses and
metrics of ``MoEBlock`` run unchanged (and identically on every rank that holds the same
tokens). Per forward:

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

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..model.moe import dispatch_sorted
from .comm import CommGroup, all_to_all_async, copy_to, exchange_counts, gather_rows, \
    reduce_from, split_rows, wait
from .layout import split_range, split_sizes


def source_to_expert_order(counts_SE: torch.Tensor) -> torch.Tensor:
    """Row order that regroups received rows from [source][expert] blocks (``counts_SE[s, e]``
    rows each, source-major) into [expert][source] blocks."""
    lengths = counts_SE.reshape(-1)
    starts_SE = (lengths.cumsum(0) - lengths).view_as(counts_SE)
    lengths_ES, starts_ES = counts_SE.t().reshape(-1), starts_SE.t().reshape(-1)
    block_begin = lengths_ES.cumsum(0) - lengths_ES
    offset = torch.repeat_interleave(starts_ES - block_begin, lengths_ES)
    return offset + torch.arange(int(lengths.sum()), device=counts_SE.device)


class ExpertParallel:
    """The all-to-all dispatcher attached to an experts module (``experts.parallel``) that
    holds this rank's ``num_experts / ep.size`` experts (``SwiGLUExperts`` or FP8 experts, with
    ETP each holding a slice of the intermediate size). ``token_group`` splits the tokens
    before dispatch (the TP group when ETP = 1; a one-rank group otherwise);
    ``a2a_chunks > 1`` pipelines the exchange with the expert compute (see ``exchange``). The
    experts module keeps its parameters and names; this object is a value, not a submodule."""

    def __init__(self, num_experts: int, ep: CommGroup, etp: CommGroup, token_group: CommGroup,
                 a2a_chunks: int = 1) -> None:
        self.num_experts, self.a2a_chunks = num_experts, a2a_chunks
        self.ep, self.etp, self.token_group = ep, etp, token_group

    def __call__(self, experts: nn.Module, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        group = self.token_group
        if group.active:
            sizes = split_sizes(x_TH.shape[0], group.size)
            start = sum(sizes[:group.rank])
            rows = slice(start, start + sizes[group.rank])
            x_TH, weights_TK = split_rows(x_TH, sizes, group), split_rows(weights_TK, sizes, group)
            expert_ids_TK = expert_ids_TK[rows]
            keep_TK = keep_TK[rows] if keep_TK is not None else None

        def local_experts(x_SH: torch.Tensor, counts: list[int], first: int) -> torch.Tensor:
            return reduce_from(experts.sorted_ffn(copy_to(x_SH, self.etp), counts, first),
                               self.etp)

        def ffn(x_SH: torch.Tensor, counts: list[int]) -> torch.Tensor:
            """Rows sorted by (global) expert in, outputs in the same order out."""
            if torch.is_autocast_enabled(x_SH.device.type):  # send what the GEMMs will read
                x_SH = x_SH.to(torch.get_autocast_dtype(x_SH.device.type))
            return exchange(x_SH, counts, self.ep, local_experts, self.a2a_chunks)

        y_TH = dispatch_sorted(x_TH, expert_ids_TK, weights_TK, self.num_experts, ffn, keep_TK,
                               kernels=experts.kernels)
        return gather_rows(y_TH, sizes, group) if group.active else y_TH


class _Chunk(NamedTuple):
    """The rows of a group of local experts on every rank, for one pipelined exchange."""

    rows: torch.Tensor          # indices into the sender's sorted rows, in send order
    sent: list[int]             # rows to each rank
    got: list[int]              # rows from each rank
    order: torch.Tensor         # received rows regrouped by local expert
    local_counts: list[int]     # rows per local expert of the group
    first: int                  # the group's first local expert


def _plan_chunks(counts_RE: torch.Tensor, received_SE: torch.Tensor, chunks: int,
                 device: torch.device) -> list[_Chunk]:
    flat = counts_RE.reshape(-1)
    offsets_RE = (flat.cumsum(0) - flat).view_as(counts_RE)
    plans = []
    for c in range(min(chunks, counts_RE.shape[1])):
        e0, e1 = split_range(counts_RE.shape[1], min(chunks, counts_RE.shape[1]), c)
        lengths = counts_RE[:, e0:e1].sum(1)
        rows = torch.cat([torch.arange(int(offsets_RE[r, e0]), int(offsets_RE[r, e0] + n))
                          for r, n in enumerate(lengths.tolist())])
        recv_SE = received_SE[:, e0:e1]
        plans.append(_Chunk(rows.to(device), lengths.tolist(), recv_SE.sum(1).tolist(),
                            source_to_expert_order(recv_SE).to(device),
                            recv_SE.sum(0).tolist(), e0))
    return plans


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def exchange(x_SH: torch.Tensor, counts: list[int], ep: CommGroup,
             local_fn: Callable[[torch.Tensor, list[int], int], torch.Tensor],
             chunks: int = 1) -> torch.Tensor:
    """The all-to-all round trip: rows sorted by global expert (``counts[e]`` rows for expert
    e, experts split evenly over ``ep`` in rank order) go to their expert's rank, where
    ``local_fn(rows, counts, first)`` runs on them grouped by local expert (``counts`` rows for
    each of the local experts ``first, first + 1, ...``); the results come back in the original
    order. Differentiable.

    With ``chunks > 1`` the local experts are taken in that many groups and the exchanges are
    pipelined: while one group computes, the next group's rows are in flight and the previous
    group's results travel back (the backward pass exchanges synchronously).
    """
    counts_RE = torch.tensor(counts, dtype=torch.long).view(ep.size, -1)
    received_SE = exchange_counts(counts_RE, ep)
    plans = _plan_chunks(counts_RE, received_SE, chunks, x_SH.device)
    inbound = [all_to_all_async(x_SH[plans[0].rows], plans[0].got, plans[0].sent, ep)]
    outbound = []
    for c, plan in enumerate(plans):
        if c + 1 < len(plans):  # the next group's rows travel while this one computes
            nxt = plans[c + 1]
            inbound.append(all_to_all_async(x_SH[nxt.rows], nxt.got, nxt.sent, ep))
        x_recv = wait(*inbound[c])
        y = local_fn(x_recv[plan.order], plan.local_counts, plan.first)
        outbound.append(all_to_all_async(y[_inverse(plan.order)], plan.sent, plan.got, ep))
    y_rows = torch.cat([wait(*o) for o in outbound])
    return y_rows[_inverse(torch.cat([p.rows for p in plans]))]
