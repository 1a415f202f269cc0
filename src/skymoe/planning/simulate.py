"""Event simulation of one pipeline training step: a layout's stage costs replayed in each
rank's schedule order (``skymoe.planning.orders``).

A rank runs its operations one at a time in that order. A forward of micro-batch m on stage s
starts when its rank is free and stage s - 1's forward of m has arrived (its end, + the
point-to-point time when stage s - 1 sits on another rank); a backward when stage s + 1's
backward of m has arrived (the last stage's: its own forward). Sends do not occupy the rank
(they overlap with its compute).

Memory of a rank: the static bytes (weights, gradients, optimizer states) of its stages + the
most activations its order holds at once (for each of its stages, the micro-batches in flight
times the bytes kept for their backward; recomputed layers keep only their input) + while a
recomputed layer re-runs its forward, that layer's full activations once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..errors import ConfigError
from ..parallel.pipeline_layout import PipelineLayout
from .cost import CostProfile
from .orders import (BACKWARD, FORWARD, check_schedule, holdings, in_flight, rank_order,
                     rank_stages, stage_ranks)
from .stages import StageCost, StageCosts


def rank_peak(costs: list[StageCost], held: tuple[tuple[int, ...], ...],
              own: tuple[int, ...]) -> int:
    """Peak bytes of the rank running stages ``own`` (``held``: its holdings): its stages'
    static bytes + the most activations its order holds at once + the largest recompute
    transient among its stages."""
    mine = [costs[s] for s in own]
    kept = max(sum(n * c.kept for n, c in zip(v, mine)) for v in held)
    return sum(c.static for c in mine) + kept + max(c.transient for c in mine)


@lru_cache(maxsize=64)
def _event_order(ranks: int, micro_batches: int, schedule: str, stages_per_rank: int) -> tuple[
        tuple[int, int, int, int, bool, bool], ...]:
    """All operations in an order that respects every dependency, each as (rank, stage, its
    slot, the slot of the operation it waits for or -1, whether that input crosses a link
    between ranks, is a forward). A slot indexes the end times:
    (kind * stages + stage) * micro_batches + m."""
    orders = rank_order(ranks, micro_batches, schedule, stages_per_rank)
    owner = stage_ranks(schedule, ranks, stages_per_rank)
    stages = ranks * stages_per_rank

    def slot(kind: int, stage: int, m: int) -> int:
        return (kind * stages + stage) * micro_batches + m

    events, done, pos = [], set(), [0] * ranks
    while len(events) < stages * 2 * micro_batches:
        progressed = False
        for r, ops in enumerate(orders):
            while pos[r] < len(ops):
                kind, s, m = ops[pos[r]]
                if kind == FORWARD:
                    source = s - 1 if s > 0 else -1
                    dep = slot(FORWARD, source, m) if source >= 0 else -1
                else:  # the last stage's backward follows its own forward (loss included)
                    source = s + 1 if s < stages - 1 else -1
                    dep = slot(BACKWARD, source, m) if source >= 0 else slot(FORWARD, s, m)
                if dep >= 0 and dep not in done:
                    break
                events.append((r, s, slot(kind, s, m), dep,
                               source >= 0 and owner[source] != r, kind == FORWARD))
                done.add(events[-1][2])
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"the {schedule} order deadlocked in simulation")
    return tuple(events)


def _replay(forward: list[float], backward: list[float], p2p: float, ranks: int,
            micro_batches: int, schedule: str) -> float:
    """Step time of the event simulation: every operation starts when its rank is free and
    its input (the neighbouring stage's forward or backward of the same micro-batch) has
    arrived."""
    end = [0.0] * (2 * len(forward) * micro_batches)
    free = [0.0] * ranks
    for r, s, own, dep, hop, is_forward in _event_order(ranks, micro_batches, schedule,
                                                        len(forward) // ranks):
        ready = (end[dep] + p2p if hop else end[dep]) if dep >= 0 else 0.0
        free[r] = (free[r] if free[r] > ready else ready) + (forward[s] if is_forward
                                                             else backward[s])
        end[own] = free[r]
    return max(free)


@dataclass(frozen=True)
class Simulation:
    """A layout's simulated step: per stage the forward and backward seconds of one
    micro-batch and micro-batches in flight, per pipeline rank (``stages_per_rank`` stages
    each, placed as ``schedule`` places them) its peak bytes, and the step time."""

    layout: PipelineLayout
    schedule: str
    micro_batches: int
    stages: tuple[StageCost, ...]
    in_flight: tuple[int, ...]
    rank_peaks: tuple[int, ...]
    step_time: float
    stages_per_rank: int = 1

    @property
    def ranks(self) -> int:
        """Pipeline ranks (devices of one pipeline)."""
        return len(self.rank_peaks)

    def rank_stages(self, rank: int) -> list[int]:
        """The stages ``rank`` runs."""
        return list(rank_stages(self.schedule, self.ranks, self.stages_per_rank)[rank])

    def rank_of(self, stage: int) -> int:
        """The rank that runs ``stage``."""
        return stage_ranks(self.schedule, self.ranks, self.stages_per_rank)[stage]

    @property
    def busy(self) -> list[float]:
        """Seconds each rank computes during the step."""
        return [sum(self.micro_batches * (self.stages[s].forward + self.stages[s].backward)
                    for s in self.rank_stages(r)) for r in range(self.ranks)]

    @property
    def bubble_fraction(self) -> float:
        """1 - mean busy time / step time: the share of device time spent waiting."""
        return 1.0 - sum(self.busy) / len(self.busy) / self.step_time

    @property
    def peak_bytes(self) -> list[int]:
        """Each rank's peak memory (one per stage when a rank runs one stage)."""
        return list(self.rank_peaks)


def simulate_costs(layout: PipelineLayout, costs: list[StageCost], held: list[int],
                   profile: CostProfile, micro_batches: int, schedule: str,
                   stages_per_rank: int) -> Simulation:
    """The ``Simulation`` of ``layout`` with these stage costs (``held``: micro-batches in
    flight per stage)."""
    ranks = len(costs) // stages_per_rank
    hold = holdings(ranks, micro_batches, schedule, stages_per_rank)
    placed = rank_stages(schedule, ranks, stages_per_rank)
    peaks = tuple(rank_peak(costs, hold[r], placed[r]) for r in range(ranks))
    step = _replay([c.forward for c in costs], [c.backward for c in costs], profile.p2p_time,
                   ranks, micro_batches, schedule)
    return Simulation(layout, schedule, micro_batches, tuple(costs), tuple(held), peaks, step,
                          stages_per_rank)


def ranks_of(layout: PipelineLayout, stages_per_rank: int) -> int:
    """Pipeline ranks of ``layout`` with ``stages_per_rank`` stages each."""
    if stages_per_rank < 1 or layout.stages % stages_per_rank:
        raise ConfigError(f"a layout of {layout.stages} stages cannot run {stages_per_rank} "
                          "stages on each pipeline rank; give pipeline ranks x stages per "
                          "rank layer counts")
    return layout.stages // stages_per_rank


def simulate(layout: PipelineLayout, profile: CostProfile, micro_batches: int,
             schedule: str = "1f1b", stages_per_rank: int = 1) -> Simulation:
    """Replay one training step of ``layout`` (``layout.stages / stages_per_rank`` pipeline
    ranks) under ``schedule`` with ``profile``'s costs."""
    ranks = ranks_of(layout, stages_per_rank)
    check_schedule(schedule, ranks, micro_batches, stages_per_rank)
    layout.validate(profile.num_layers)
    held = in_flight(ranks, micro_batches, schedule, stages_per_rank)
    costs = StageCosts(profile, layout.stages, held)
    stage_costs = [costs.cost(s, layout.stage_layers(s).start, layout.stage_layers(s).stop,
                              layout.recompute[s]) for s in range(layout.stages)]
    return simulate_costs(layout, stage_costs, held, profile, micro_batches, schedule,
                          stages_per_rank)
