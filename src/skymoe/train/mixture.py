"""Batches drawn from several token datasets by weight, deterministically from the seed.

Sample ``s`` of the run (counted over the whole run, every rank agreeing) comes from dataset
``d`` when a seeded hash of ``s`` falls in ``d``'s share of ``[0, 1)``; within a dataset the
samples follow that dataset's own shuffled epochs (a ``SequenceLoader`` drawing one row at a
time). The choice of every sample depends on the seed and ``s`` alone and the state is global
(samples drawn, each dataset's position), so a run resumed under another number of
data-parallel ranks continues the same sample sequence, and each rank reads only its own rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError
from .data import SequenceLoader
from .token_rows import TokenRows

_GOLDEN = 0x9E3779B97F4A7C15
_DATASET_SEEDS = 1_000_003  # dataset i shuffles with seed + (i + 1) * this


def seeded_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """A number in [0, 1) for each integer of ``index``, from ``seed`` (splitmix64)."""
    z = index.astype(np.uint64) + np.uint64((seed * _GOLDEN + _GOLDEN) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


class MixtureLoader:
    """Resumable batches of ``batch_size`` rows from ``datasets`` mixed by ``weights``."""

    def __init__(self, datasets: Sequence[TokenRows], weights: Sequence[float],
                 batch_size: int, seed: int) -> None:
        if len(weights) != len(datasets) or not all(w > 0 for w in weights):
            raise DataError(f"mixture weights {list(weights)} must be one positive number per "
                            f"dataset ({len(datasets)})")
        self.loaders = [SequenceLoader(rows, 1, seed + (i + 1) * _DATASET_SEEDS)
                        for i, rows in enumerate(datasets)]
        self.weights = [float(w) for w in weights]
        share = np.cumsum(np.asarray(self.weights))
        self._bounds = share / share[-1]
        self.batch_size, self.seed, self.samples = batch_size, seed, 0

    def choices(self, start: int, count: int) -> np.ndarray:
        """The dataset of each sample ``start ... start + count - 1``."""
        u = seeded_uniform(self.seed, np.arange(start, start + count))
        return np.minimum(np.searchsorted(self._bounds, u, side="right"), len(self.loaders) - 1)

    def next_batch(self, local: tuple[int, int] | None = None) -> torch.Tensor:
        """The next batch (``[batch_size, L]`` int64), or only its rows ``local = (start,
        stop)``: each rank reads just its own."""
        choice = self.choices(self.samples, self.batch_size)
        rows = np.empty(self.batch_size, dtype=np.int64)
        for d, loader in enumerate(self.loaders):
            mine = choice == d
            rows[mine] = loader.take(int(mine.sum())).numpy()
        self.samples += self.batch_size
        start, stop = local or (0, self.batch_size)
        choice, rows = choice[start:stop], rows[start:stop]
        out = torch.empty(stop - start, self.loaders[0].rows.seq_len, dtype=torch.int64)
        for d, loader in enumerate(self.loaders):
            at = np.nonzero(choice == d)[0]
            if len(at):
                out[torch.from_numpy(at)] = loader.rows.read(torch.from_numpy(rows[at]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "datasets": [lo.state_dict() for lo in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a loader over the same datasets and weights."""
        try:
            samples, datasets = int(state["samples"]), list(state["datasets"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"bad mixture loader state {state!r}; expected {{'samples': int, "
                            "'datasets': [...]}; resume with the same data settings") from None
        if len(datasets) != len(self.loaders):
            raise DataError(f"the loader state has {len(datasets)} datasets, the run "
                            f"{len(self.loaders)}; resume with the same data.prepared")
        for loader, sub in zip(self.loaders, datasets):
            loader.load_state_dict(sub)
        self.samples = samples


__all__ = ["MixtureLoader", "seeded_uniform"]
