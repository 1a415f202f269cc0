"""Sharded checkpoints written in the background while training goes on
(``train.async_checkpoint``).

The same two phases as torch's ``dcp.async_save``: the pieces are first staged, copied into
memory of their own on the training thread (so the next steps cannot change what is being
written), then a background thread runs the whole atomic save on the checkpoint process group,
apart from the training traffic: DCP's write of every rank's pieces, the ranks' agreement,
rank 0's publishing and pruning. The cost is one copy of this rank's pieces (its weights and
moments) held while a save is in flight. One save at a time: the next save, and the end of the
run, first wait for the previous one and report its failure. A run that dies meanwhile leaves
only a temporary directory, which resume never picks up.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from ..checkpoint.dcp import Piece
from . import run_state


def stage(pieces: dict[str, Piece]) -> dict[str, Piece]:
    """Copies of ``pieces`` in CPU memory of their own (compact, unaffected by training)."""
    return {k: Piece(p.tensor.detach().to("cpu", copy=True).contiguous(), p.shape, p.offsets)
            for k, p in pieces.items()}


class BackgroundSaver:
    """Runs one ``save_sharded_checkpoint`` at a time on a background thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Path | BaseException | None = None

    def start(self, pieces: dict[str, Piece], trainer_state: dict[str, Any],
              **save_args: Any) -> None:
        """Stage ``pieces`` and this moment's trainer and RNG states, then save them in the
        background (``save_args`` as ``run_state.save_sharded_checkpoint`` takes them). Waits
        for a save still in flight first."""
        self.wait()
        staged = stage(pieces)
        frozen = json.loads(json.dumps(trainer_state))  # the loader's position now, not later
        rng = run_state.capture_rng()
        self._run(lambda: run_state.save_sharded_checkpoint(
            pieces=staged, trainer_state=frozen, rng=rng, **save_args))

    def _run(self, save: Callable[[], Path]) -> None:
        def target() -> None:
            try:
                self._result = save()
            except BaseException as exc:  # re-raised on the training thread by wait()
                self._result = exc

        # A daemon: a run that fails elsewhere must not hang at exit on a peer that is gone.
        self._thread = threading.Thread(target=target, name="skymoe-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is on disk; its checkpoint's path, or
        raise its error (``CheckpointError`` on every rank when any rank failed)."""
        if self._thread is None:
            return None
        self._thread.join()
        result, self._thread, self._result = self._result, None, None
        if isinstance(result, BaseException):
            raise result
        return result


__all__ = ["BackgroundSaver", "stage"]
