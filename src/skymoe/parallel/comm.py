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

Those whose backward communicates (``copy_to``, ``split_rows``, ``all_to_all_async``) are
chained by the groups' ``CollectiveOrder``: in backward each waits for the next one's, so every
rank issues them in the reverse of their forward order, whatever the data and whatever order
the autograd engine would pick (docs/distributed.md, "Collective order").
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


class CollectiveOrder:
    """Puts the backward collectives of one forward pass in a fixed order on every rank: the
    reverse of their forward order (which is program order, the same on every rank).

    Without it the order is whatever the autograd engine derives from each rank's graph, and
    the graph depends on the data: a rank whose experts received no rows has no path from the
    loss through its all-to-all, so it never runs that all-to-all's backward while its peers
    wait in it. So while a forward pass runs with gradients (``begin`` .. ``finish``),
    ``token`` is a scalar that each collective whose backward communicates takes as an extra
    input and replaces with a new one, and ``finish`` attaches the last token to the pass's
    output. In backward a collective then runs only once the gradient of the token it made
    has arrived, which only the next collective's backward sends: each collective runs, and
    runs after every later one. ``recompute_point`` puts the recomputation of a checkpointed
    region (which re-issues its forward collectives) at a fixed place in the same chain.
    """

    def __init__(self) -> None:
        self.token: torch.Tensor | None = None

    def begin(self, device: torch.device | str = "cpu") -> None:
        """Start the chain of a forward pass (no chain without gradients)."""
        self.token = (torch.zeros((), device=device, requires_grad=True)
                      if torch.is_grad_enabled() else None)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` whose backward starts the chain (pass the output the loss is
        differentiated from); ends the chain."""
        token = self.token
        if token is None:
            return x
        # Links made after the pass (a checkpointed region recomputed in backward) take a
        # token outside the chain that still requires gradients, so they build the graph the
        # forward built: the same saved tensors, which checkpointing checks.
        self.token = token.detach().requires_grad_()
        return _Attach.apply(x, token)

    def recompute_point(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the output of a region that may be recomputed in backward) with a link in
        the chain whose backward reads a tensor saved in the region: under activation
        checkpointing that read recomputes the region, so its forward collectives run there,
        after the backward of every later collective and before any of the region's own."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return self.link(_RecomputePoint.apply(x, self.token))

    def link(self, outputs: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """The output of a chained autograd function, whose next token becomes the chain's."""
        y, token = outputs
        if token is not None:
            self.token = token
        return y


def _next_token(token: torch.Tensor | None) -> torch.Tensor | None:
    return None if token is None else token.new_zeros(())


def _token_grad(ctx) -> torch.Tensor | None:
    return ctx.token_like.new_zeros(()) if ctx.token_like is not None else None


def _keep_token(ctx, token: torch.Tensor | None) -> None:
    ctx.token_like = None if token is None else token.detach()


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        _keep_token(ctx, token)
        return x.clone()  # not a view of x: pipeline schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, _token_grad(ctx)


class _RecomputePoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor | None):
        _keep_token(ctx, token)
        ctx.save_for_backward(x)
        return x.view_as(x), _next_token(token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _token: torch.Tensor | None):
        ctx.saved_tensors  # under activation checkpointing: the region is recomputed here
        return grad, _token_grad(ctx)


@dataclass(frozen=True, eq=False)
class CommGroup:
    """A process group as a value: the group (None when it has one rank), its size, this
    rank's index in it, the traffic counter it reports to, and the ``CollectiveOrder`` its
    backward collectives join (one per mesh: all the groups of a rank share it)."""

    pg: dist.ProcessGroup | None
    size: int
    rank: int
    traffic: Traffic
    name: str = ""
    order: CollectiveOrder = field(default_factory=CollectiveOrder)

    @property
    def active(self) -> bool:
        return self.size > 1

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.pg, group_rank) if self.active else group_rank


def single(traffic: Traffic | None = None, name: str = "",
           order: CollectiveOrder | None = None) -> CommGroup:
    """A one-rank group: every collective on it is a no-op."""
    return CommGroup(None, 1, 0, traffic or Traffic(), name, order or CollectiveOrder())


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
# The functions whose backward communicates take the chain's token last and return the next
# one (see ``CollectiveOrder``); their backward runs the collective whatever gradient arrives
# (zeros where this rank's output took no part in the loss) and gives the token a gradient.
class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup, token: torch.Tensor | None):
        ctx.group = group
        _keep_token(ctx, token)
        return x, _next_token(token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _token: torch.Tensor | None):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None, _token_grad(ctx)


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup) -> torch.Tensor:
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group: CommGroup,
                token: torch.Tensor | None):
        ctx.sizes, ctx.group = sizes, group
        _keep_token(ctx, token)
        start = sum(sizes[:group.rank])
        return x[start:start + sizes[group.rank]], _next_token(token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _token: torch.Tensor | None):
        return (all_gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None,
                _token_grad(ctx))


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
                group: CommGroup, pending: Pending, token: torch.Tensor | None):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        _keep_token(ctx, token)
        x = x.contiguous()
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        sent = sum(n for r, n in enumerate(in_splits) if r != group.rank)
        group.traffic.record("all_to_all", sent * math.prod(x.shape[1:]) * x.element_size(),
                             group.size)
        pending.work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group.pg,
                                              async_op=True)
        pending.buffers = (x, out)
        return out, _next_token(token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _token: torch.Tensor | None):
        out_splits, in_splits = ctx.splits
        return (all_to_all_rows(grad, in_splits, out_splits, ctx.group), None, None, None, None,
                _token_grad(ctx))


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
    out = group.order.link(_AllToAllStart.apply(x, out_splits, in_splits, group, pending,
                                                  group.order.token))
    return out, pending


def wait(x: torch.Tensor, pending: Pending) -> torch.Tensor:
    """``x`` once the all-to-all that fills it has finished."""
    return _Wait.apply(x, pending) if pending.work is not None else x


def copy_to(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Identity; the gradient is all-reduced over ``group`` (input of a sharded computation)."""
    if not group.active:
        return x
    return group.order.link(_CopyTo.apply(x, group, group.order.token))


def reduce_from(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Sum of the ranks' partial results; the gradient passes through unchanged."""
    return _ReduceFrom.apply(x, group) if group.active else x


def split_rows(x: torch.Tensor, sizes: list[int], group: CommGroup) -> torch.Tensor:
    """This rank's block of rows (``sizes`` per rank); the gradient is all-gathered."""
    if not group.active:
        return x
    return group.order.link(_SplitRows.apply(x, sizes, group, group.order.token))


def gather_rows(x: torch.Tensor, sizes: list[int], group: CommGroup) -> torch.Tensor:
    """Every rank's rows concatenated; the gradient of this rank's block is kept."""
    return _GatherRows.apply(x, sizes, group) if group.active else x
