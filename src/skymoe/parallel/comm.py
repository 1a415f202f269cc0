"""Collectives with byte accounting, and the autograd functions that parallel layers use.

Every collective of the parallel code goes through this module, so ``Traffic`` sees all of it.
Bytes are counted as what *this rank sends* under the standard algorithms (ring all-reduce:
``2 (n-1)/n * S``; ring all-gather: ``(n-1)/n`` of the gathered output; reduce and broadcast:
``(n-1)/n * S``; all-to-all: the rows sent to other ranks). The same formulas
(``collective_bytes``) price an analytical step in ``skymoe.parallel.traffic``.

The autograd functions are Megatron's conjugate pairs, for activations that are replicated
over a group (each rank holds the full value and the full gradient):

- ``copy_to``: identity forward, all-reduce of the gradient backward (enter a sharded region);
- ``reduce_from``: all-reduce forward, identity backward (leave it, summing partial results);
- ``split_rows`` / ``gather_rows``: keep this rank's rows forward and all-gather the gradient,
  and the reverse;
- ``all_to_all_async`` / ``wait``: variable-split exchange that runs while the caller
  computes; backward sends the gradient back the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COLLECTIVES = ("all_to_all", "all_reduce", "all_gather", "reduce", "broadcast", "send")


def collective_bytes(kind: str, nbytes: float, group_size: int) -> float:
    """Bytes one rank sends for a collective over ``group_size`` ranks on ``nbytes`` of data
    (the local input; for all-to-all the bytes addressed to *other* ranks)."""
    n = group_size
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n * nbytes
    if kind == "all_gather":
        return float((n - 1) * nbytes)
    if kind in ("reduce", "broadcast"):
        return (n - 1) / n * nbytes
    if kind in ("all_to_all", "send"):
        return float(nbytes)
    raise ValueError(f"unknown collective {kind!r}; known: {COLLECTIVES}")


@dataclass
class Traffic:
    """Bytes this rank sent, and calls made, per collective kind."""

    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, kind: str, nbytes: float, group_size: int) -> None:
        self.bytes[kind] += collective_bytes(kind, nbytes, group_size)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, float]:
        return {k: self.bytes.get(k, 0.0) for k in COLLECTIVES}


@dataclass(frozen=True, eq=False)
class CommGroup:
    """A process group as a value: the group (None when it has one rank), its size, this
    rank's index in it, and the traffic counter it reports to."""

    pg: dist.ProcessGroup | None
    size: int
    rank: int
    traffic: Traffic
    name: str = ""

    @property
    def active(self) -> bool:
        return self.size > 1

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.pg, group_rank) if self.active else group_rank


def single(traffic: Traffic | None = None, name: str = "") -> CommGroup:
    """A one-rank group: every collective on it is a no-op."""
    return CommGroup(None, 1, 0, traffic or Traffic(), name)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------- plain ops
def all_reduce_(t: torch.Tensor, group: CommGroup,
                op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group``."""
    if group.active:
        group.traffic.record("all_reduce", _nbytes(t), group.size)
        dist.all_reduce(t, op=op, group=group.pg)
    return t


def reduce_(t: torch.Tensor, dst: int, group: CommGroup) -> torch.Tensor:
    """Sum ``t`` onto group rank ``dst`` (other ranks' ``t`` is left unspecified)."""
    if group.active:
        group.traffic.record("reduce", _nbytes(t), group.size)
        dist.reduce(t, dst=group.global_rank(dst), group=group.pg)
    return t


def broadcast_(t: torch.Tensor, src: int, group: CommGroup) -> torch.Tensor:
    """Overwrite ``t`` on every rank with group rank ``src``'s."""
    if group.active:
        group.traffic.record("broadcast", _nbytes(t), group.size)
        dist.broadcast(t, src=group.global_rank(src), group=group.pg)
    return t


def all_gather_rows(x: torch.Tensor, sizes: list[int], group: CommGroup) -> torch.Tensor:
    """Concatenate every rank's rows (rank r holds ``sizes[r]`` of them) on every rank."""
    if not group.active:
        return x
    longest = max(sizes)
    padded = x if x.shape[0] == longest else torch.cat(
        (x, x.new_zeros(longest - x.shape[0], *x.shape[1:])))
    parts = [torch.empty_like(padded) for _ in range(group.size)]
    group.traffic.record("all_gather", _nbytes(padded), group.size)
    dist.all_gather(parts, padded.contiguous(), group=group.pg)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                    group: CommGroup) -> torch.Tensor:
    """Send ``in_splits[r]`` consecutive rows of ``x`` to group rank r; receive
    ``out_splits[r]`` rows from each, concatenated in rank order."""
    if not group.active:
        return x
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    row = math.prod(x.shape[1:]) * x.element_size()
    sent = sum(n for r, n in enumerate(in_splits) if r != group.rank)
    group.traffic.record("all_to_all", sent * row, group.size)
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group.pg)
    return out


def exchange_counts(counts: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """All-to-all of a [group.size, n] int64 table: row r goes to rank r; returns the rows
    received, row s from rank s (how many items each rank will send us)."""
    if not group.active:
        return counts
    out = torch.empty_like(counts)
    group.traffic.record("all_to_all", _nbytes(counts[0]) * (group.size - 1), group.size)
    dist.all_to_all_single(out, counts.contiguous(), group=group.pg)
    return out


# ------------------------------------------------------------------------ autograd functions
class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup) -> torch.Tensor:
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group: CommGroup) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        start = sum(sizes[:group.rank])
        return x[start:start + sizes[group.rank]]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group: CommGroup) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.sizes[:ctx.group.rank])
        return grad[start:start + ctx.sizes[ctx.group.rank]], None, None


class Pending:
    """An all-to-all in flight: its work handle and the buffers it uses."""

    def __init__(self) -> None:
        self.work: dist.Work | None = None
        self.buffers: tuple[torch.Tensor, ...] = ()

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.work, self.buffers = None, ()


class _AllToAllStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: CommGroup, pending: Pending) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        x = x.contiguous()
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        sent = sum(n for r, n in enumerate(in_splits) if r != group.rank)
        group.traffic.record("all_to_all", sent * math.prod(x.shape[1:]) * x.element_size(),
                             group.size)
        pending.work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group.pg,
                                              async_op=True)
        pending.buffers = (x, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return all_to_all_rows(grad, in_splits, out_splits, ctx.group), None, None, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: Pending) -> torch.Tensor:
        pending.wait()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_to_all_async(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                     group: CommGroup) -> tuple[torch.Tensor, Pending]:
    """Start a differentiable all-to-all and return its (not yet filled) output with the
    handle to pass to ``wait``; compute can run meanwhile. Backward is synchronous."""
    pending = Pending()
    if not group.active:
        return x, pending
    return _AllToAllStart.apply(x, out_splits, in_splits, group, pending), pending


def wait(x: torch.Tensor, pending: Pending) -> torch.Tensor:
    """``x`` once the all-to-all that fills it has finished."""
    return _Wait.apply(x, pending) if pending.work is not None else x


def copy_to(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Identity; the gradient is all-reduced over ``group`` (input of a sharded computation)."""
    return _CopyTo.apply(x, group) if group.active else x


def reduce_from(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Sum of the ranks' partial results; the gradient passes through unchanged."""
    return _ReduceFrom.apply(x, group) if group.active else x


def split_rows(x: torch.Tensor, sizes: list[int], group: CommGroup) -> torch.Tensor:
    """This rank's block of rows (``sizes`` per rank); the gradient is all-gathered."""
    return _SplitRows.apply(x, sizes, group) if group.active else x


def gather_rows(x: torch.Tensor, sizes: list[int], group: CommGroup) -> torch.Tensor:
    """Every rank's rows concatenated; the gradient of this rank's block is kept."""
    return _GatherRows.apply(x, sizes, group) if group.active else x
