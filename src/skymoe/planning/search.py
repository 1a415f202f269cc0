"""Pipeline planner: how many decoder layers each stage runs and how many of them recompute
their activations, chosen to minimize the simulated step time within each device's memory
(docs/pipeline.md: non-uniform pipeline split and recomputation).

``plan_pipeline`` searches: a dynamic program over contiguous splits (``_best_split``)
minimizes the slowest stage's forward + backward time (each stage with the least recompute
that fits its memory budget), then a local search moves single layers between stages while
the simulated step time (``skymoe.planning.simulate``) drops. With V stages per rank each
stage's budget is the device memory / V: the sum of the stages' own peaks bounds the rank's
peak, so every such split fits; the recompute this over-provisions is then given back while
the rank's exact peak still fits. ``evaluate_layout`` checks and simulates a given layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from ..errors import ConfigError
from ..parallel.pipeline_layout import PipelineLayout
from .cost import CostProfile, format_bytes
from .orders import check_schedule, holdings, in_flight, rank_stages, stage_ranks
from .simulate import Simulation, rank_peak, ranks_of, simulate, simulate_costs
from .stages import StageCost, StageCosts

A = TypeVar("A")


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


def _best_split(layers: int, stages: int, start: A,
                extend: Callable[[A, int, int, int], A | None],
                key: Callable[[A], tuple]) -> tuple[A, list[int]] | None:
    """The contiguous split of ``layers`` layers over ``stages`` stages (only the first and
    last stage may be empty) whose accumulated value has the least ``key``: ``extend(acc,
    stage, first, end)`` adds stage ``stage`` running layers ``first .. end - 1`` to the value
    ``acc`` of the stages before it (``start`` for none), or says None when that stage cannot
    run them. Ties keep the split found first. Returns (value, layers per stage) or None."""
    # best[s][end]: (value, start of stage s) over stages 0..s covering layers [0, end)
    best: list[list[tuple[A, int] | None]] = [[None] * (layers + 1) for _ in range(stages)]
    for s in range(stages):
        ends = [layers] if s == stages - 1 else range(layers + 1)
        for end in ends:
            for first in range(end + 1) if s > 0 else (0,):
                prev = best[s - 1][first] if s > 0 else (start, 0)
                if prev is None or (first == end and 0 < s < stages - 1):
                    continue
                value = extend(prev[0], s, first, end)
                if value is None:
                    continue
                if best[s][end] is None or key(value) < key(best[s][end][0]):
                    best[s][end] = (value, first)
    if best[stages - 1][layers] is None:
        return None
    counts, end = [], layers
    for s in range(stages - 1, -1, -1):
        first = best[s][end][1]
        counts.append(end - first)
        end = first
    return best[stages - 1][layers][0], counts[::-1]


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
        self.holdings = holdings(ranks, micro_batches, schedule, stages_per_rank)
        self.placed = rank_stages(schedule, ranks, stages_per_rank)
        self.owner = stage_ranks(schedule, ranks, stages_per_rank)
        self.costs = StageCosts(profile, self.stages, self.held)
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
                own = sorted((s for s in self.placed[rank] if options[s][0]),
                             key=lambda s: costs[s].forward + costs[s].backward, reverse=True)
                for s in own:
                    recompute, cost = options[s]
                    costs[s] = self.costs.cost(s, firsts[s], firsts[s] + counts[s], recompute - 1)
                    if rank_peak(costs, self.holdings[rank], self.placed[rank]) <= self.memory:
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
        return simulate_costs(layout, [c for _, c in options], self.held, self.profile,
                              self.micro_batches, self.schedule, self.per_rank)

    def bottleneck_split(self) -> list[int] | None:
        """Contiguous split minimizing (slowest stage's forward + backward, total of them),
        each stage with the least recompute that fits its budget."""
        def extend(acc: tuple[float, float], s: int, first: int,
                   end: int) -> tuple[float, float] | None:
            option = self.costs.least_recompute(s, first, end, self.budget)
            if option is None:
                return None
            t = option[1].forward + option[1].backward
            return max(acc[0], t), acc[1] + t

        found = _best_split(self.profile.num_layers, self.stages, (0.0, 0.0), extend,
                            key=lambda acc: acc)
        return None if found is None else found[1]

    def smallest_peak(self) -> tuple[int, int]:
        """(stage, bytes) of the fullest stage under the split that minimizes it, every
        layer recomputed: the least budget any layout needs."""
        def extend(acc: tuple[int, int], s: int, first: int, end: int) -> tuple[int, int]:
            peak = self.costs.cost(s, first, end, end - first).peak
            return (peak, s) if peak > acc[0] else acc

        found = _best_split(self.profile.num_layers, self.stages, (0, -1), extend,
                            key=lambda acc: acc[:1])
        (peak, stage), _ = found
        return stage, peak

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
            crosses = s + 1 < len(costs) and self.owner[s + 1] != self.owner[s]
            hop = 2 * self.profile.p2p_time if crosses else 0.0
            before += cost.forward + cost.backward + hop
        for r in range(self.ranks):
            bound = max(bound, sum(self.micro_batches * (costs[s].forward + costs[s].backward)
                                   for s in self.placed[r]))
        return bound


def _check_shape(profile: CostProfile, ranks: int, micro_batches: int, memory_bytes: int,
                 schedule: str, stages_per_rank: int) -> None:
    check_schedule(schedule, ranks, micro_batches, stages_per_rank)
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


def _does_not_fit(sim: Simulation, search: _Search, rank: int, peak: int) -> ConfigError:
    """The error for a given layout whose ``rank`` needs ``peak`` bytes, saying what to do."""
    layout, memory_bytes = sim.layout, search.memory
    own = sim.rank_stages(rank)
    static = sum(sim.stages[s].static for s in own)
    if sim.stages_per_rank > 1:
        return ConfigError(
            f"rank {rank} (stages {', '.join(map(str, own))}) of {layout.describe()} needs "
            f"{format_bytes(peak)} ({format_bytes(static)} static + "
            f"{format_bytes(peak - static)} activations, in flight "
            f"{', '.join(str(sim.in_flight[s]) for s in own)}) but a device has "
            f"{format_bytes(memory_bytes)}; recompute more layers of these stages or move "
            "layers off them, or use a smaller micro-batch or more memory")
    stage = own[0]
    layers = layout.stage_layers(stage)
    option = search.costs.least_recompute(stage, layers.start, layers.stop, memory_bytes)
    hint = (f"recompute {option[0]} of its layers" if option is not None
            else "move layers off it (recomputing all of them is not enough)")
    return ConfigError(
        f"stage {stage} of {layout.describe()} needs {format_bytes(peak)} "
        f"({format_bytes(static)} static + {format_bytes(peak - static)} "
        f"activations for {sim.in_flight[stage]} micro-batch(es) in flight) but a device has "
        f"{format_bytes(memory_bytes)}; {hint}, or use a smaller micro-batch or more memory")


def evaluate_layout(layout: PipelineLayout, profile: CostProfile, micro_batches: int,
                    memory_bytes: int, schedule: str = "1f1b", stages_per_rank: int = 1) -> Plan:
    """Simulate a given layout (``layout.stages / stages_per_rank`` pipeline ranks) and
    compare it with the uniform split; raises ``ConfigError`` naming the rank (its stages)
    and its bytes when a rank does not fit ``memory_bytes``."""
    ranks = ranks_of(layout, stages_per_rank)
    _check_shape(profile, ranks, micro_batches, memory_bytes, schedule, stages_per_rank)
    sim = simulate(layout, profile, micro_batches, schedule, stages_per_rank)
    search = _Search(profile, ranks, micro_batches, memory_bytes, schedule, stages_per_rank)
    for r, peak in enumerate(sim.rank_peaks):
        if peak > memory_bytes:
            raise _does_not_fit(sim, search, r, peak)
    uniform = _uniform(search)
    return Plan(layout, sim, memory_bytes, uniform.layout if uniform else None, uniform,
                profile.source, planned=False)
