"""Spawning gloo workers on 127.0.0.1 for multi-process tests."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout_s: float, fn: Callable[..., Any],
           args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 120) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes (a collective waiting longer
    than ``timeout_s`` fails); a failure in any re-raises here with that rank's traceback."""
    mp.spawn(_entry, args=(world, free_port(), timeout_s, fn, args), nprocs=world, join=True)
