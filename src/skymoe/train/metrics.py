"""Per-layer MoE metrics of one optimizer step, summed over its micro-batches, and the run's
metrics log (``metrics.jsonl``, read back by ``skymoe plot``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..model.moe import MoEStats, accumulate_stats


class MoEStepStats:
    """Sums of the per-layer statistics (``MoEStats``) of one step's training forwards;
    ``summary`` turns them into the step's metrics (one list entry per MoE layer)."""

    def __init__(self, layer_indices: list[int]) -> None:
        self.layers = layer_indices
        self._sums: dict[int, MoEStats] | None = None

    def add(self, stats: dict[int, MoEStats] | None) -> None:
        """Add one forward's statistics (every MoE layer's, by global layer index)."""
        if not stats:
            return
        if sorted(stats) != sorted(self.layers):
            raise ValueError(f"stats for layers {sorted(stats)}, expected {self.layers}")
        if self._sums is None:
            self._sums = {}
        accumulate_stats(self._sums, stats)

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` in place to every accumulated sum, layer by layer in one fixed order
        (e.g. an all-reduce over data-parallel ranks, so every rank sees the whole step's
        statistics)."""
        for s in self._layer_sums():
            for v in s.tensors():
                fn(v)

    def _layer_sums(self) -> list[MoEStats]:
        return [self._sums[i] for i in self.layers] if self._sums is not None else []

    def drop_rates(self) -> list[float]:
        """Dropped assignments / (k * tokens) per layer over the whole step."""
        return [float(s.dropped / s.load.sum()) for s in self._layer_sums()]

    def loads(self) -> dict[int, torch.Tensor]:
        """Assignments routed to each expert (before capacity) over the whole step, by layer."""
        return {i: s.load for i, s in zip(self.layers, self._layer_sums())}

    def summary(self) -> dict[str, Any]:
        """The step's per-layer metrics; loads are fractions of the k*T routed assignments
        (before capacity), CV is the population std / mean of the experts' counts."""
        out: dict[str, Any] = {"layers": self.layers}
        rows: dict[str, list] = {k: [] for k in ("drop_rate", "aux_loss", "z_loss", "load_min",
                                                  "load_max", "load_cv", "dead_experts",
                                                  "max1_max2", "max2_max3")}
        for s in self._layer_sums():
            load = s.load / s.load.sum()
            rows["drop_rate"].append(float(s.dropped / s.load.sum()))
            rows["aux_loss"].append(float(s.aux_loss / s.tokens))
            rows["z_loss"].append(float(s.z_loss / s.tokens))
            rows["load_min"].append(float(load.min()))
            rows["load_max"].append(float(load.max()))
            rows["load_cv"].append(float(load.std(correction=0) / load.mean()))
            rows["dead_experts"].append(int((s.load == 0).sum()))
            rows["max1_max2"].append(float(s.max1_max2 / s.tokens))
            rows["max2_max3"].append(float(s.max2_max3 / s.tokens))
        out.update(rows)
        return out

    def reset(self) -> None:
        self._sums = None


class MetricsLog:
    """Append-only JSONL log; each record is flushed and fsynced so a killed run keeps every
    completed step (a torn last line is skipped by the reader).

    With ``keep_through_step``, an existing log is first rewritten (atomically) to the records
    of steps up to that one: a resumed run redoes the steps after its checkpoint, and each
    step keeps one record."""

    def __init__(self, path: str | Path, keep_through_step: int | None = None) -> None:
        self.path = Path(path)
        if keep_through_step is not None and self.path.is_file():
            _truncate_to_step(self.path, keep_through_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _truncate_to_step(path: Path, last_step: int) -> None:
    """Rewrite ``path`` keeping the whole records whose step is at most ``last_step``: a
    temporary file, fsynced, renamed over the log."""
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed run
            if isinstance(record, dict) and record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
