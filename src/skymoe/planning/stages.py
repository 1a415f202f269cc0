"""What a stage costs: the profile's layers ``first .. end - 1`` of one stage, with the
embedding on the first stage and the head on the last, some layers recomputed."""

from __future__ import annotations

from typing import NamedTuple

from .cost import CostProfile


class StageCost(NamedTuple):
    """One stage under a layout: seconds per micro-batch, static bytes, the bytes kept per
    micro-batch in flight, the recompute transient, and the most micro-batches it holds."""

    forward: float
    backward: float
    static: int
    kept: int        # bytes kept for the backward of one micro-batch
    transient: int   # the largest recomputed layer's activations, back while it re-runs
    held: int        # micro-batches in flight at most

    @property
    def activation(self) -> int:
        """Micro-batches in flight x kept bytes + the recompute transient."""
        return self.held * self.kept + self.transient

    @property
    def peak(self) -> int:
        """Static + activation bytes: the stage's peak were it alone on its rank."""
        return self.static + self.activation


class StageCosts:
    """Stage costs of any contiguous layer range from prefix sums of the profile."""

    def __init__(self, profile: CostProfile, stages: int, held: list[int]) -> None:
        self.p, self.stages, self.held = profile, stages, held

        def prefix(values: tuple) -> list:
            out = [0]
            for v in values:
                out.append(out[-1] + v)
            return out

        self.fwd, self.bwd = prefix(profile.layer_forward), prefix(profile.layer_backward)
        self.act, self.static = prefix(profile.layer_activation), prefix(profile.layer_static)
        self._options: dict[tuple[int, int, int], tuple[int, StageCost] | None] = {}

    def cost(self, stage: int, first: int, end: int, recompute: int) -> StageCost:
        """Stage ``stage`` running layers ``first .. end - 1``, the first ``recompute`` of them
        recomputed."""
        return self._costs(stage, first, end, recompute, None)[-1][1]

    def least_recompute(self, stage: int, first: int, end: int,
                        memory: int) -> tuple[int, StageCost] | None:
        """The fewest recomputed layers with which the stage fits ``memory`` (and its cost),
        or None when even recomputing all of them does not fit."""
        key = (stage, first, end)
        if key not in self._options:
            last = self._costs(stage, first, end, end - first, memory)[-1]
            self._options[key] = last if last[1].peak <= memory else None
        return self._options[key]

    def _costs(self, stage: int, first: int, end: int, most: int,
               memory: int | None) -> list[tuple[int, StageCost]]:
        """Costs with 0, 1, .. ``most`` layers recomputed, stopping at the first that fits
        ``memory`` (when given). Each recomputed layer keeps its checkpoint instead of its
        activations on every micro-batch in flight, and the largest of them comes back once
        while it re-runs."""
        p = self.p
        is_first, is_last = stage == 0, stage == self.stages - 1
        forward = self.fwd[end] - self.fwd[first]
        backward = self.bwd[end] - self.bwd[first]
        kept = self.act[end] - self.act[first]
        static = self.static[end] - self.static[first]
        if is_first:
            forward += p.embed_forward
            backward += p.embed_backward
            kept += p.embed_activation
            static += p.embed_static
        if is_last:
            forward += p.head_forward
            backward += p.head_backward
            kept += p.head_activation
            static += p.head_static
        else:
            kept += p.output_bytes
        held = self.held[stage]
        out, transient = [], 0
        for r in range(most + 1):
            if r:
                j = first + r - 1
                backward += p.layer_recompute[j]
                freed = p.layer_activation[j] - p.layer_checkpoint[j]
                kept -= freed
                transient = max(transient, freed)
            out.append((r, StageCost(forward, backward, static, kept, transient, held)))
            if memory is not None and out[-1][1].peak <= memory:
                break
        return out
