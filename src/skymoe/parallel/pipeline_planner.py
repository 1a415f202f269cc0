"""Pipeline planner: how many decoder layers each stage runs and how many of them recompute
their activations, chosen to minimize the simulated step time within each device's memory
(docs/pipeline.md: non-uniform pipeline split and recomputation).

``simulate`` replays a schedule event by event with the per-rank operation order of
``torch.distributed.pipelining`` (the runtime, ``skymoe.parallel.pipeline``). P pipeline ranks
run P * V stages, rank r holding stages r, r + P, ... (``stages_of_rank``):

- ``1f1b`` (``Schedule1F1B``, V = 1): stage s runs min(P - s, M) forwards, then alternates
  one backward and one forward until the forwards run out, then the remaining backwards; it
  holds up to min(P - s, M) micro-batches of activations;
- ``gpipe`` (``ScheduleGPipe``, V = 1): all M forwards, then all M backwards; it holds M;
- ``interleaved-1f1b`` (``ScheduleInterleaved1F1B``, V >= 2): the order torch computes for
  each rank (``_calculate_single_rank_operations``), taken from torch itself.

A rank runs its operations one at a time in that order. A forward of micro-batch m on stage s
starts when its rank is free and stage s - 1's forward of m has arrived (its end, + the
point-to-point time when stage s - 1 sits on another rank); a backward when stage s + 1's
backward of m has arrived (the last stage's: its own forward). Sends do not occupy the rank
(they overlap with its compute).

Memory of a rank: the static bytes (weights, gradients, optimizer states) of its stages + the
most activations its order holds at once (for each of its stages, the micro-batches in flight
times the bytes kept for their backward; recomputed layers keep only their input) + while a
recomputed layer re-runs its forward, that layer's full activations once more.

``plan_pipeline`` searches: a dynamic program over contiguous splits minimizes the slowest
stage's forward + backward time (each stage with the least recompute that fits its memory
budget), then a local search moves single layers between stages while the simulated step time
drops. With V stages per rank each stage's budget is the device memory / V: the sum of the
stages' own peaks bounds the rank's peak, so every such split fits; the recompute this
over-provisions is then given back while the rank's exact peak still fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import NamedTuple

from ..errors import ConfigError
from .pipeline_cost import GIB, CostProfile
from .pipeline_layout import PipelineLayout

SCHEDULES = ("1f1b", "gpipe", "interleaved-1f1b")
MULTI_STAGE_SCHEDULES = ("interleaved-1f1b",)  # several stages per rank (V >= 2)
FORWARD, BACKWARD = 0, 1


# ---------------------------------------------------------------------------- schedule order
def _check_run(ranks: int, micro_batches: int, schedule: str, stages_per_rank: int) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; use one of {SCHEDULES}")
    if ranks < 1:
        raise ConfigError(f"the number of pipeline ranks must be >= 1, got {ranks}")
    if micro_batches < 1:
        raise ConfigError(f"the number of micro-batches must be >= 1, got {micro_batches}")
    if schedule in MULTI_STAGE_SCHEDULES:
        if stages_per_rank < 2:
            raise ConfigError(f"the {schedule} schedule runs several stages per pipeline rank; "
                              f"stages per rank must be >= 2, got {stages_per_rank} (use 1f1b "
                              "for one stage per rank)")
        rounds = max(1, micro_batches // ranks)
        if micro_batches % rounds:
            raise ConfigError(f"the {schedule} schedule with {ranks} pipeline ranks needs a "
                              f"number of micro-batches divisible by max(1, micro-batches // "
                              f"ranks) = {rounds}, got {micro_batches} (torch's "
                              f"ScheduleInterleaved1F1B); use a multiple of {ranks}")
        return
    if stages_per_rank != 1:
        raise ConfigError(f"the {schedule} schedule runs one stage per pipeline rank, got "
                          f"{stages_per_rank} stages per rank; use 1 or the interleaved-1f1b "
                          "schedule")
    if schedule == "1f1b" and micro_batches < ranks:
        raise ConfigError(f"the 1f1b schedule needs at least as many micro-batches per step "
                          f"({micro_batches}) as pipeline stages ({ranks}) (torch's "
                          "Schedule1F1B); use more micro-batches or the gpipe schedule")


def _one_stage_order(stage: int, stages: int, micro_batches: int,
                     schedule: str) -> tuple[tuple[int, int, int], ...]:
    """Schedule1F1B's or ScheduleGPipe's order of one stage (it is its rank's order)."""
    forwards = [(FORWARD, stage, m) for m in range(micro_batches)]
    backwards = [(BACKWARD, stage, m) for m in range(micro_batches)]
    if schedule == "gpipe":
        return tuple(forwards + backwards)
    warmup = min(micro_batches, stages - stage)
    ops = forwards[:warmup]
    for m in range(micro_batches - warmup):  # steady state: one backward, one forward
        ops += [backwards[m], forwards[warmup + m]]
    return tuple(ops + backwards[micro_batches - warmup:])


def _interleaved_order(ranks: int, stages_per_rank: int, micro_batches: int) -> tuple[
        tuple[tuple[int, int, int], ...], ...]:
    """ScheduleInterleaved1F1B's order of every rank, computed by torch's own (private)
    method on the few attributes it reads, so the simulation follows the runtime exactly."""
    try:
        from torch.distributed.pipelining.schedules import (ScheduleInterleaved1F1B,
                                                            _ComputationType)
        kinds = {_ComputationType.FORWARD: FORWARD, _ComputationType.FULL_BACKWARD: BACKWARD}
        rounds = max(1, micro_batches // ranks)
        state = SimpleNamespace(n_local_stages=stages_per_rank, pp_group_size=ranks,
                                microbatches_per_round=micro_batches // rounds,
                                _n_microbatches=micro_batches)
        actions = [[a for a in ScheduleInterleaved1F1B._calculate_single_rank_operations(
            state, r) if a is not None] for r in range(ranks)]
        orders = tuple(tuple((kinds[a.computation_type], a.stage_index, a.microbatch_index)
                             for a in rank_actions) for rank_actions in actions)
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        raise ConfigError(
            "cannot simulate the interleaved-1f1b schedule: this torch's "
            "ScheduleInterleaved1F1B._calculate_single_rank_operations (a private API the "
            f"planner reads the order from) is missing or changed ({exc!r}); plan with torch "
            "2.13 or use the 1f1b or gpipe schedule") from None
    return orders


@lru_cache(maxsize=64)
def rank_order(ranks: int, micro_batches: int, schedule: str, stages_per_rank: int = 1) -> tuple[
        tuple[tuple[int, int, int], ...], ...]:
    """Per pipeline rank, its operations in execution order: ``(FORWARD or BACKWARD, stage,
    micro-batch)``, stages numbered over the whole pipeline (rank r holds r, r + P, ...)."""
    _check_run(ranks, micro_batches, schedule, stages_per_rank)
    if schedule in MULTI_STAGE_SCHEDULES:
        return _interleaved_order(ranks, stages_per_rank, micro_batches)
    return tuple(_one_stage_order(s, ranks, micro_batches, schedule) for s in range(ranks))


def in_flight(ranks: int, micro_batches: int, schedule: str,
              stages_per_rank: int = 1) -> list[int]:
    """Per stage, the most micro-batches whose forward has run and backward has not."""
    held = [0] * (ranks * stages_per_rank)
    peak = [0] * len(held)
    for ops in rank_order(ranks, micro_batches, schedule, stages_per_rank):
        for kind, s, _ in ops:
            held[s] += 1 if kind == FORWARD else -1
            peak[s] = max(peak[s], held[s])
    return peak


@lru_cache(maxsize=64)
def _holdings(ranks: int, micro_batches: int, schedule: str, stages_per_rank: int) -> tuple[
        tuple[tuple[int, ...], ...], ...]:
    """Per rank, the micro-batches in flight on each of its stages (r, r + P, ...) at every
    moment that may be its memory peak: after each forward, keeping only the vectors no other
    one covers (the peak over any kept bytes per stage is reached at one of them)."""
    out = []
    for r, ops in enumerate(rank_order(ranks, micro_batches, schedule, stages_per_rank)):
        held, seen = [0] * stages_per_rank, set()
        for kind, s, _ in ops:
            held[s // ranks] += 1 if kind == FORWARD else -1
            if kind == FORWARD:
                seen.add(tuple(held))
        out.append(tuple(v for v in seen if not any(
            w != v and all(a >= b for a, b in zip(w, v)) for w in seen)))
    return tuple(out)


@lru_cache(maxsize=64)
def _event_order(ranks: int, micro_batches: int, schedule: str, stages_per_rank: int) -> tuple[
        tuple[int, int, int, int, bool, bool], ...]:
    """All operations in an order that respects every dependency, each as (rank, stage, its
    slot, the slot of the operation it waits for or -1, whether that input crosses a link
    between ranks, is a forward). A slot indexes the end times:
    (kind * stages + stage) * micro_batches + m."""
    orders = rank_order(ranks, micro_batches, schedule, stages_per_rank)
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
                events.append((r, s, slot(kind, s, m), dep, source >= 0 and source % ranks != r,
                               kind == FORWARD))
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


# ------------------------------------------------------------------------------ stage costs
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


def _rank_peak(costs: list[StageCost], holdings: tuple[tuple[int, ...], ...], rank: int,
               ranks: int) -> int:
    """Peak bytes of ``rank``: its stages' static bytes + the most activations its order
    holds at once + the largest recompute transient among its stages."""
    own = costs[rank::ranks]
    held = max(sum(n * c.kept for n, c in zip(v, own)) for v in holdings[rank])
    return sum(c.static for c in own) + held + max(c.transient for c in own)


class _Costs:
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


# ------------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class Simulation:
    """A layout's simulated step: per stage the forward and backward seconds of one
    micro-batch and micro-batches in flight, per pipeline rank (``stages_per_rank`` stages
    each: rank r holds r, r + P, ...) its peak bytes, and the step time."""

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
        return list(range(rank, len(self.stages), self.ranks))

    @property
    def busy(self) -> list[float]:
        """Seconds each rank computes during the step."""
        return [sum(self.micro_batches * (c.forward + c.backward)
                    for c in self.stages[r::self.ranks]) for r in range(self.ranks)]

    @property
    def bubble_fraction(self) -> float:
        """1 - mean busy time / step time: the share of device time spent waiting."""
        return 1.0 - sum(self.busy) / len(self.busy) / self.step_time

    @property
    def peak_bytes(self) -> list[int]:
        """Each rank's peak memory (one per stage when a rank runs one stage)."""
        return list(self.rank_peaks)


def _simulation(layout: PipelineLayout, costs: list[StageCost], held: list[int],
                profile: CostProfile, micro_batches: int, schedule: str,
                stages_per_rank: int) -> Simulation:
    ranks = len(costs) // stages_per_rank
    holdings = _holdings(ranks, micro_batches, schedule, stages_per_rank)
    peaks = tuple(_rank_peak(costs, holdings, r, ranks) for r in range(ranks))
    step = _replay([c.forward for c in costs], [c.backward for c in costs], profile.p2p_time,
                   ranks, micro_batches, schedule)
    return Simulation(layout, schedule, micro_batches, tuple(costs), tuple(held), peaks, step,
                      stages_per_rank)


def _ranks_of(layout: PipelineLayout, stages_per_rank: int) -> int:
    if stages_per_rank < 1 or layout.stages % stages_per_rank:
        raise ConfigError(f"a layout of {layout.stages} stages cannot run {stages_per_rank} "
                          "stages on each pipeline rank; give pipeline ranks x stages per "
                          "rank layer counts")
    return layout.stages // stages_per_rank


def simulate(layout: PipelineLayout, profile: CostProfile, micro_batches: int,
             schedule: str = "1f1b", stages_per_rank: int = 1) -> Simulation:
    """Replay one training step of ``layout`` (``layout.stages / stages_per_rank`` pipeline
    ranks) under ``schedule`` with ``profile``'s costs."""
    ranks = _ranks_of(layout, stages_per_rank)
    _check_run(ranks, micro_batches, schedule, stages_per_rank)
    layout.validate(profile.num_layers)
    held = in_flight(ranks, micro_batches, schedule, stages_per_rank)
    costs = _Costs(profile, layout.stages, held)
    stage_costs = [costs.cost(s, layout.stage_layers(s).start, layout.stage_layers(s).stop,
                              layout.recompute[s]) for s in range(layout.stages)]
    return _simulation(layout, stage_costs, held, profile, micro_batches, schedule,
                       stages_per_rank)


# ------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class Plan:
    """A layout with its simulation, the memory limit it was checked against, and the uniform
    split (each stage with the least recompute that fits; None when it cannot fit)."""

    layout: PipelineLayout
    simulation: Simulation
    memory_bytes: int
    uniform_layout: PipelineLayout | None
    uniform: Simulation | None
    source: str
    planned: bool = True   # False: a given layout evaluated

    @property
    def gain(self) -> float | None:
        """Predicted throughput gain over the uniform split (0.05: 5% more steps per second),
        or None when the uniform split does not fit."""
        if self.uniform is None:
            return None
        return self.uniform.step_time / self.simulation.step_time - 1.0


def format_bytes(n: float) -> str:
    """``2.50 GiB``, ``12.00 MiB``, ``300 B``."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


class _Search:
    """Layouts as layer counts per stage, each stage with its least recompute that fits its
    budget (the device memory / stages per rank), then, with several stages per rank, the
    recompute the rank's exact peak does not need given back."""

    def __init__(self, profile: CostProfile, ranks: int, micro_batches: int,
                 memory_bytes: int, schedule: str, stages_per_rank: int) -> None:
        self.profile, self.ranks, self.memory = profile, ranks, memory_bytes
        self.stages, self.per_rank = ranks * stages_per_rank, stages_per_rank
        self.budget = memory_bytes // stages_per_rank
        self.micro_batches, self.schedule = micro_batches, schedule
        self.held = in_flight(ranks, micro_batches, schedule, stages_per_rank)
        self.holdings = _holdings(ranks, micro_batches, schedule, stages_per_rank)
        self.costs = _Costs(profile, self.stages, self.held)
        self._options: dict[tuple[int, ...], list[tuple[int, StageCost]] | None] = {}

    def stage_options(self, counts: list[int]) -> list[tuple[int, StageCost]] | None:
        """Per stage (recompute, cost), or None when some stage cannot fit (memoized: the
        local search asks for a layout once to bound it and once to simulate it)."""
        key = tuple(counts)
        if key not in self._options:
            self._options[key] = self._stage_options(counts)
        return self._options[key]

    def _stage_options(self, counts: list[int]) -> list[tuple[int, StageCost]] | None:
        options, first = [], 0
        for s, n in enumerate(counts):
            if n == 0 and 0 < s < self.stages - 1:
                return None
            option = self.costs.least_recompute(s, first, first + n, self.budget)
            if option is None:
                return None
            options.append(option)
            first += n
        if self.per_rank > 1:  # with one stage per rank the budget is already exact
            self.give_back(counts, options)
        return options

    def give_back(self, counts: list[int], options: list[tuple[int, StageCost]]) -> None:
        """Lower recompute (in place) while each rank's exact peak still fits: the per-stage
        budgets assume all of a rank's stages peak at once, which its order rarely does. One
        layer at a time, on the slowest of the rank's stages that can (it is likeliest on the
        critical path)."""
        firsts = [sum(counts[:s]) for s in range(len(counts))]
        costs = [c for _, c in options]
        for rank in range(self.ranks):
            while True:
                own = sorted((s for s in range(rank, self.stages, self.ranks) if options[s][0]),
                             key=lambda s: costs[s].forward + costs[s].backward, reverse=True)
                for s in own:
                    recompute, cost = options[s]
                    costs[s] = self.costs.cost(s, firsts[s], firsts[s] + counts[s], recompute - 1)
                    if _rank_peak(costs, self.holdings, rank, self.ranks) <= self.memory:
                        options[s] = (recompute - 1, costs[s])
                        break
                    costs[s] = cost
                else:
                    break

    def simulation(self, counts: list[int]) -> Simulation | None:
        options = self.stage_options(counts)
        if options is None:
            return None
        layout = PipelineLayout(tuple(counts), tuple(r for r, _ in options))
        return _simulation(layout, [c for _, c in options], self.held, self.profile,
                           self.micro_batches, self.schedule, self.per_rank)

    def bottleneck_split(self) -> list[int] | None:
        """Contiguous split minimizing (slowest stage's forward + backward, total of them)."""
        n_layers, stages = self.profile.num_layers, self.stages
        # best[s][end]: (slowest, total, start of stage s) over stages 0..s covering [0, end)
        best: list[list[tuple[float, float, int] | None]] = [
            [None] * (n_layers + 1) for _ in range(stages)]
        for s in range(stages):
            ends = [n_layers] if s == stages - 1 else range(n_layers + 1)
            for end in ends:
                for first in range(end + 1) if s > 0 else (0,):
                    prev = best[s - 1][first] if s > 0 else (0.0, 0.0, 0)
                    if prev is None:
                        continue
                    if first == end and 0 < s < stages - 1:
                        continue
                    option = self.costs.least_recompute(s, first, end, self.budget)
                    if option is None:
                        continue
                    t = option[1].forward + option[1].backward
                    candidate = (max(prev[0], t), prev[1] + t, first)
                    if best[s][end] is None or candidate[:2] < best[s][end][:2]:
                        best[s][end] = candidate
        if best[stages - 1][n_layers] is None:
            return None
        counts, end = [], n_layers
        for s in range(stages - 1, -1, -1):
            first = best[s][end][2]
            counts.append(end - first)
            end = first
        return counts[::-1]

    def improve(self, counts: list[int]) -> Simulation:
        """Move one layer at a time between any two stages while the step time drops."""
        current = self.simulation(counts)
        while True:
            best = current
            for i in range(self.stages):
                for j in range(self.stages):
                    if i == j or counts[i] == 0:
                        continue
                    moved = list(counts)
                    moved[i] -= 1
                    moved[j] += 1
                    options = self.stage_options(moved)
                    if options is None:
                        continue
                    if self.lower_bound([c for _, c in options]) >= best.step_time:
                        continue
                    sim = self.simulation(moved)
                    if sim.step_time < best.step_time * (1 - 1e-9):
                        best = sim
            if best is current:
                return current
            current, counts = best, list(best.layout.layers)

    def lower_bound(self, costs: list[StageCost]) -> float:
        """A step time no schedule beats: stage s cannot start before the first micro-batch
        has come through the stages before it, is then busy for M (forward + backward), and
        its last backward still has to go back through them; and a rank is busy for all of
        its stages' work."""
        bound, before = 0.0, 0.0
        for s, cost in enumerate(costs):
            busy = self.micro_batches * (cost.forward + cost.backward)
            bound = max(bound, before + busy)
            hop = 2 * self.profile.p2p_time if (s + 1) % self.ranks != s % self.ranks else 0.0
            before += cost.forward + cost.backward + hop
        for r in range(self.ranks):
            bound = max(bound, sum(self.micro_batches * (c.forward + c.backward)
                                   for c in costs[r::self.ranks]))
        return bound

    def smallest_peak(self) -> tuple[int, int]:
        """(stage, bytes) of the fullest stage under the split that minimizes it, every
        layer recomputed: the least budget any layout needs."""
        n_layers, stages = self.profile.num_layers, self.stages
        best: list[list[tuple[int, int, int] | None]] = [
            [None] * (n_layers + 1) for _ in range(stages)]
        for s in range(stages):
            ends = [n_layers] if s == stages - 1 else range(n_layers + 1)
            for end in ends:
                for first in range(end + 1) if s > 0 else (0,):
                    prev = best[s - 1][first] if s > 0 else (0, -1, 0)
                    if prev is None or (first == end and 0 < s < stages - 1):
                        continue
                    peak = self.costs.cost(s, first, end, end - first).peak
                    candidate = (peak, s, first) if peak > prev[0] else (prev[0], prev[1], first)
                    if best[s][end] is None or candidate[0] < best[s][end][0]:
                        best[s][end] = candidate
        worst = best[stages - 1][n_layers]
        return worst[1], worst[0]


def _check_shape(profile: CostProfile, ranks: int, micro_batches: int, memory_bytes: int,
                 schedule: str, stages_per_rank: int) -> None:
    _check_run(ranks, micro_batches, schedule, stages_per_rank)
    if memory_bytes <= 0:
        raise ConfigError(f"the memory per device must be positive, got {memory_bytes} bytes")
    stages = ranks * stages_per_rank
    if profile.num_layers < stages - 2:
        raise ConfigError(f"{stages} pipeline stages need at least {stages - 2} decoder layers "
                          f"(every stage but the first and last runs one), the model has "
                          f"{profile.num_layers}; use fewer stages")


def _uniform(search: _Search) -> Simulation | None:
    counts = PipelineLayout.uniform(search.profile.num_layers, search.stages).layers
    return search.simulation(list(counts))


def plan_pipeline(profile: CostProfile, ranks: int, micro_batches: int, memory_bytes: int,
                  schedule: str = "1f1b", stages_per_rank: int = 1) -> Plan:
    """The layout (layers and recomputed layers per stage) of ``profile``'s model over
    ``ranks`` pipeline ranks of ``stages_per_rank`` stages each with the least simulated step
    time among those whose every rank fits ``memory_bytes``. Raises ``ConfigError`` saying
    what to change when none fits."""
    _check_shape(profile, ranks, micro_batches, memory_bytes, schedule, stages_per_rank)
    search = _Search(profile, ranks, micro_batches, memory_bytes, schedule, stages_per_rank)
    split = search.bottleneck_split()
    if split is None:
        stage, peak = search.smallest_peak()
        held = search.held[stage]
        shared = (f" ({stages_per_rank} stages per rank: each is planned within "
                  f"{format_bytes(search.budget)})" if stages_per_rank > 1 else "")
        raise ConfigError(
            f"no split of {profile.num_layers} layers over {search.stages} stages fits in "
            f"{format_bytes(memory_bytes)} per device{shared} ({schedule}, {micro_batches} "
            f"micro-batches): even recomputing every layer, the best split needs "
            f"{format_bytes(peak)} on stage {stage} ({held} micro-batch"
            f"{'es' if held > 1 else ''} in flight); use more pipeline stages, a smaller "
            "micro-batch or sequence, more memory per device, or more tensor/expert/data "
            "parallelism" + (" or the 1f1b schedule" if schedule == "gpipe" else ""))
    uniform = _uniform(search)
    best = search.improve(split)
    if uniform is not None:
        from_uniform = search.improve(list(uniform.layout.layers))
        if from_uniform.step_time < best.step_time:
            best = from_uniform
    return Plan(best.layout, best, memory_bytes, uniform.layout if uniform else None, uniform,
                profile.source)


def evaluate_layout(layout: PipelineLayout, profile: CostProfile, micro_batches: int,
                    memory_bytes: int, schedule: str = "1f1b", stages_per_rank: int = 1) -> Plan:
    """Simulate a given layout (``layout.stages / stages_per_rank`` pipeline ranks) and
    compare it with the uniform split; raises ``ConfigError`` naming the rank (its stages)
    and its bytes when a rank does not fit ``memory_bytes``."""
    ranks = _ranks_of(layout, stages_per_rank)
    _check_shape(profile, ranks, micro_batches, memory_bytes, schedule, stages_per_rank)
    sim = simulate(layout, profile, micro_batches, schedule, stages_per_rank)
    search = _Search(profile, ranks, micro_batches, memory_bytes, schedule, stages_per_rank)
    for r, peak in enumerate(sim.rank_peaks):
        if peak <= memory_bytes:
            continue
        own = sim.rank_stages(r)
        static = sum(sim.stages[s].static for s in own)
        if stages_per_rank > 1:
            raise ConfigError(
                f"rank {r} (stages {', '.join(map(str, own))}) of {layout.describe()} needs "
                f"{format_bytes(peak)} ({format_bytes(static)} static + "
                f"{format_bytes(peak - static)} activations, in flight "
                f"{', '.join(str(sim.in_flight[s]) for s in own)}) but a device has "
                f"{format_bytes(memory_bytes)}; recompute more layers of these stages or move "
                "layers off them, or use a smaller micro-batch or more memory")
        layers = layout.stage_layers(r)
        option = search.costs.least_recompute(r, layers.start, layers.stop, memory_bytes)
        hint = (f"recompute {option[0]} of its layers" if option is not None
                else "move layers off it (recomputing all of them is not enough)")
        raise ConfigError(
            f"stage {r} of {layout.describe()} needs {format_bytes(peak)} "
            f"({format_bytes(static)} static + {format_bytes(peak - static)} "
            f"activations for {sim.in_flight[r]} micro-batch(es) in flight) but a device has "
            f"{format_bytes(memory_bytes)}; {hint}, or use a smaller micro-batch or more memory")
    uniform = _uniform(search)
    return Plan(layout, sim, memory_bytes, uniform.layout if uniform else None, uniform,
                profile.source, planned=False)


# ------------------------------------------------------------------------------------ report
def _layer_range(layers: range) -> str:
    if not layers:
        return "-"
    return f"{layers.start}-{layers.stop - 1}" if len(layers) > 1 else str(layers.start)


def format_plan(plan: Plan) -> str:
    """A per-stage table of ``plan`` with its step time, bubble and gain over uniform (what
    ``skymoe plan pipeline`` prints). The peak column is the stage's rank's peak (with one
    stage per rank, the stage's own)."""
    sim, layout = plan.simulation, plan.layout
    unit, scale = ("GiB", GIB) if plan.memory_bytes >= GIB else ("MiB", 2**20)
    over = (f"{sim.ranks} ranks x {sim.stages_per_rank} stages" if sim.stages_per_rank > 1
            else f"{layout.stages} stages")
    lines = [
        f"{'plan' if plan.planned else 'layout'}: {layout.num_layers} layers over {over}, "
        f"{sim.schedule}, {sim.micro_batches} micro-batches per step",
        f"costs: {plan.source}",
        f"{'stage':>5} {'rank':>4} {'layers':>8} {'n':>3} {'recompute':>9} {'fwd+bwd ms':>11} "
        f"{'in flight':>9} {'static ' + unit:>10} {'act ' + unit:>8} {'peak ' + unit:>8} "
        f"{'limit ' + unit:>9}",
    ]
    for s, cost in enumerate(sim.stages):
        rank = s % sim.ranks
        lines.append(
            f"{s:>5} {rank:>4} {_layer_range(layout.stage_layers(s)):>8} {layout.layers[s]:>3} "
            f"{layout.recompute[s]:>9} {(cost.forward + cost.backward) * 1e3:>11.2f} "
            f"{sim.in_flight[s]:>9} {cost.static / scale:>10.2f} {cost.activation / scale:>8.2f} "
            f"{sim.rank_peaks[rank] / scale:>8.2f} {plan.memory_bytes / scale:>9.2f}")
    if sim.stages_per_rank > 1:
        lines.append("peak: its rank's (static + the most activations held at once); act: "
                     "the stage's own")
    lines.append(f"{layout.describe()}: step {sim.step_time * 1e3:.1f} ms, bubble "
                 f"{100 * sim.bubble_fraction:.1f}%")
    if plan.uniform is None:
        counts = PipelineLayout.uniform(layout.num_layers, layout.stages).layers
        lines.append(f"uniform split {','.join(map(str, counts))}: does not fit (some rank "
                     "exceeds the limit even with every layer recomputed)")
    else:
        u = plan.uniform
        lines.append(f"uniform split ({plan.uniform_layout.describe()}): step "
                     f"{u.step_time * 1e3:.1f} ms, bubble {100 * u.bubble_fraction:.1f}%")
        lines.append(f"predicted gain over uniform: {100 * plan.gain:+.1f}% throughput "
                     f"({(sim.step_time - u.step_time) * 1e3:+.1f} ms per step)")
    return "\n".join(lines)
