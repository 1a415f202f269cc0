"""Failing fast and naming the culprit when a rank dies or stalls.

Every collective runs under the process group's timeout (``parallel.timeout_s``), so a peer
that died or hangs makes the others' collective raise instead of waiting forever. The errors
gloo and NCCL raise then rarely say *which* rank is missing, and the broken group cannot be
used to ask. So each rank that sees a collective fail checks in at the rendezvous store (the
key-value store torchrun's processes met at, which outlives the group) and waits up to a probe
interval for the others: the ranks that never check in are the dead or stalled ones, and the
``TrainingError`` names them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch.distributed as dist

from ..errors import TrainingError
from .mesh import ParallelMesh

_KEY = "skymoe/health/{}"


def unresponsive_ranks(mesh: ParallelMesh, probe_s: float) -> list[int] | None:
    """Check in at the store and return the ranks that have not checked in after ``probe_s``
    seconds ([] when all did; None when the store itself is gone)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_KEY.format(mesh.rank), "here")
        deadline = time.monotonic() + probe_s
        while True:
            missing = [r for r in range(mesh.world_size)
                       if not store.check([_KEY.format(r)])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, ValueError, dist.DistError):
        return None


@contextlib.contextmanager
def guard_collectives(mesh: ParallelMesh, probe_s: float) -> Iterator[None]:
    """Turn a failed or timed-out collective into a ``TrainingError`` naming the rank(s) that
    did not respond within ``probe_s`` (use the collective timeout, so that ranks waiting in
    another collective get the time to fail too). A no-op for one process."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if not mesh.world.active or not _is_communication_failure(exc):
            raise  # a bug on this rank: fail now (torchrun stops the others)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        missing = unresponsive_ranks(mesh, probe_s)
        if missing == []:
            raise  # every rank is alive: not a communication failure
        who = (f"rank(s) {', '.join(map(str, missing))} did not respond" if missing
               else "the rendezvous store is gone (rank 0 or torchrun died)")
        raise TrainingError(f"rank {mesh.rank}: a collective failed ({first[:200]}); {who}. "
                            "Check that rank's log; resume from the last checkpoint") from None



_COMM_MARKERS = ("gloo", "nccl", "timed out", "timeout", "connection", "peer")


def _is_communication_failure(exc: BaseException) -> bool:
    """Errors of the transport (gloo and NCCL raise plain RuntimeErrors naming themselves)."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(m in text for m in _COMM_MARKERS)
