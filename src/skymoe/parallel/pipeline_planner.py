"""Pipeline planner: how many decoder layers each stage runs and how many of them recompute
their activations, chosen to minimize the simulated step time within each device's memory
(SYSTEM.md section 4, non-uniform pipeline split and recomputation).

``simulate`` replays a schedule event by event with the per-stage operation order of
``torch.distributed.pipelining`` (the runtime, ``skymoe.parallel.pipeline``):

- ``1f1b`` (``Schedule1F1B``): stage s runs min(P - s, M) forwards, then alternates one
  backward and one forward until the forwards run out, then the remaining backwards; it holds
  up to min(P - s, M) micro-batches of activations;
- ``gpipe`` (``ScheduleGPipe``): all M forwards, then all M backwards; it holds M.

A forward of micro-batch m on stage s starts when the stage is free and stage s - 1's forward
of m has arrived (its end + the point-to-point time); a backward when stage s + 1's backward
of m has arrived. Sends do not occupy the stage (they overlap with its compute).

Memory of a stage: static bytes (weights, gradients, optimizer states) + for each micro-batch
in flight the bytes kept for its backward (recomputed layers keep only their input) + while a
recomputed layer re-runs its forward, that layer's full activations once more.

``plan_pipeline`` searches: a dynamic program over contiguous splits minimizes the slowest
stage's forward + backward time (each stage with the least recompute that fits its memory),
then a local search moves single layers between stages while the simulated step time drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from ..errors import ConfigError
from .pipeline_cost import GIB, CostProfile
from .pipeline_layout import PipelineLayout

SCHEDULES = ("1f1b", "gpipe")
FORWARD, BACKWARD = 0, 1


# ---------------------------------------------------------------------------- schedule order
def _check_run(stages: int, micro_batches: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; use one of {SCHEDULES}")
    if stages < 1:
        raise ConfigError(f"the number of pipeline stages must be >= 1, got {stages}")
    if micro_batches < 1:
        raise ConfigError(f"the number of micro-batches must be >= 1, got {micro_batches}")
    if schedule == "1f1b" and micro_batches < stages:
        raise ConfigError(f"the 1f1b schedule needs at least as many micro-batches per step "
                          f"({micro_batches}) as pipeline stages ({stages}) (torch's "
                          "Schedule1F1B); use more micro-batches or the gpipe schedule")


@lru_cache(maxsize=64)
def stage_order(stages: int, micro_batches: int, schedule: str) -> tuple[
        tuple[tuple[int, int], ...], ...]:
    """Per stage, its operations in execution order: ``(FORWARD or BACKWARD, micro-batch)``."""
    _check_run(stages, micro_batches, schedule)
    orders = []
    for s in range(stages):
        forwards = [(FORWARD, m) for m in range(micro_batches)]
        backwards = [(BACKWARD, m) for m in range(micro_batches)]
        if schedule == "gpipe":
            orders.append(tuple(forwards + backwards))
            continue
        warmup = min(micro_batches, stages - s)
        ops = forwards[:warmup]
        for m in range(micro_batches - warmup):  # steady state: one backward, one forward
            ops += [backwards[m], forwards[warmup + m]]
        ops += backwards[micro_batches - warmup:]
        orders.append(tuple(ops))
    return tuple(orders)


def in_flight(stages: int, micro_batches: int, schedule: str) -> list[int]:
    """Per stage, the most micro-batches whose forward has run and backward has not."""
    counts = []
    for ops in stage_order(stages, micro_batches, schedule):
        held = peak = 0
        for kind, _ in ops:
            held += 1 if kind == FORWARD else -1
            peak = max(peak, held)
        counts.append(peak)
    return counts


@lru_cache(maxsize=64)
def _event_order(stages: int, micro_batches: int, schedule: str) -> tuple[
        tuple[int, int, int, bool, bool], ...]:
    """All operations in an order that respects every dependency, each as (stage, its slot,
    the slot of the operation it waits for or -1, whether that input crosses a link, is a
    forward). A slot indexes the end times: (kind * stages + stage) * micro_batches + m."""
    orders = stage_order(stages, micro_batches, schedule)

    def slot(kind: int, stage: int, m: int) -> int:
        return (kind * stages + stage) * micro_batches + m

    events, done, pos = [], set(), [0] * stages
    while len(events) < stages * 2 * micro_batches:
        progressed = False
        for s, ops in enumerate(orders):
            while pos[s] < len(ops):
                kind, m = ops[pos[s]]
                if kind == FORWARD:
                    hop = s > 0
                    dep = slot(FORWARD, s - 1, m) if hop else -1
                else:  # the last stage's backward follows its own forward (loss included)
                    hop = s < stages - 1
                    dep = slot(BACKWARD, s + 1, m) if hop else slot(FORWARD, s, m)
                if dep >= 0 and dep not in done:
                    break
                events.append((s, slot(kind, s, m), dep, hop, kind == FORWARD))
                done.add(events[-1][1])
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"the {schedule} order deadlocked in simulation")
    return tuple(events)


def _replay(forward: list[float], backward: list[float], p2p: float, micro_batches: int,
            schedule: str) -> float:
    """Step time of the event simulation: every operation starts when its stage is free and
    its input (the neighbour's forward or backward of the same micro-batch) has arrived."""
    stages = len(forward)
    end = [0.0] * (2 * stages * micro_batches)
    free = [0.0] * stages
    for s, own, dep, hop, is_forward in _event_order(stages, micro_batches, schedule):
        ready = (end[dep] + p2p if hop else end[dep]) if dep >= 0 else 0.0
        free[s] = (free[s] if free[s] > ready else ready) + (forward[s] if is_forward
                                                             else backward[s])
        end[own] = free[s]
    return max(free)


# ------------------------------------------------------------------------------ stage costs
class StageCost(NamedTuple):
    """One stage under a layout: seconds per micro-batch and peak bytes."""

    forward: float
    backward: float
    static: int
    activation: int   # micro-batches in flight x kept bytes + the recompute transient

    @property
    def peak(self) -> int:
        """Static + activation bytes."""
        return self.static + self.activation


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
            out.append((r, StageCost(forward, backward, static, held * kept + transient)))
            if memory is not None and out[-1][1].peak <= memory:
                break
        return out


# ------------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class Simulation:
    """A layout's simulated step: per stage the forward and backward seconds of one
    micro-batch, its busy time over the step, micro-batches in flight and peak bytes."""

    layout: PipelineLayout
    schedule: str
    micro_batches: int
    stages: tuple[StageCost, ...]
    in_flight: tuple[int, ...]
    step_time: float

    @property
    def busy(self) -> list[float]:
        """Seconds each stage computes during the step."""
        return [self.micro_batches * (c.forward + c.backward) for c in self.stages]

    @property
    def bubble_fraction(self) -> float:
        """1 - mean busy time / step time: the share of device time spent waiting."""
        return 1.0 - sum(self.busy) / len(self.busy) / self.step_time

    @property
    def peak_bytes(self) -> list[int]:
        """Each stage's peak memory: static + activations in flight."""
        return [c.peak for c in self.stages]


def _simulation(layout: PipelineLayout, costs: list[StageCost], held: list[int],
                profile: CostProfile, micro_batches: int, schedule: str) -> Simulation:
    step = _replay([c.forward for c in costs], [c.backward for c in costs], profile.p2p_time,
                   micro_batches, schedule)
    return Simulation(layout, schedule, micro_batches, tuple(costs), tuple(held), step)


def simulate(layout: PipelineLayout, profile: CostProfile, micro_batches: int,
             schedule: str = "1f1b") -> Simulation:
    """Replay one training step of ``layout`` under ``schedule`` with ``profile``'s costs."""
    _check_run(layout.stages, micro_batches, schedule)
    layout.validate(profile.num_layers)
    held = in_flight(layout.stages, micro_batches, schedule)
    costs = _Costs(profile, layout.stages, held)
    stage_costs = [costs.cost(s, layout.stage_layers(s).start, layout.stage_layers(s).stop,
                              layout.recompute[s]) for s in range(layout.stages)]
    return _simulation(layout, stage_costs, held, profile, micro_batches, schedule)


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
    """Layouts as layer counts per stage, each stage with its least fitting recompute."""

    def __init__(self, profile: CostProfile, stages: int, micro_batches: int,
                 memory_bytes: int, schedule: str) -> None:
        self.profile, self.stages, self.memory = profile, stages, memory_bytes
        self.micro_batches, self.schedule = micro_batches, schedule
        self.held = in_flight(stages, micro_batches, schedule)
        self.costs = _Costs(profile, stages, self.held)

    def stage_options(self, counts: list[int]) -> list[tuple[int, StageCost]] | None:
        options, first = [], 0
        for s, n in enumerate(counts):
            if n == 0 and 0 < s < self.stages - 1:
                return None
            option = self.costs.least_recompute(s, first, first + n, self.memory)
            if option is None:
                return None
            options.append(option)
            first += n
        return options

    def simulation(self, counts: list[int]) -> Simulation | None:
        options = self.stage_options(counts)
        if options is None:
            return None
        layout = PipelineLayout(tuple(counts), tuple(r for r, _ in options))
        return _simulation(layout, [c for _, c in options], self.held, self.profile,
                           self.micro_batches, self.schedule)

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
                    option = self.costs.least_recompute(s, first, end, self.memory)
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
        its last backward still has to go back through them."""
        bound, before = 0.0, 0.0
        for cost in costs:
            busy = self.micro_batches * (cost.forward + cost.backward)
            bound = max(bound, before + busy)
            before += cost.forward + cost.backward + 2 * self.profile.p2p_time
        return bound

    def smallest_peak(self) -> tuple[int, int]:
        """(stage, bytes) of the fullest stage under the split that minimizes it, every
        layer recomputed: the least memory any layout needs."""
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


def _check_shape(profile: CostProfile, stages: int, micro_batches: int, memory_bytes: int,
                 schedule: str) -> None:
    _check_run(stages, micro_batches, schedule)
    if memory_bytes <= 0:
        raise ConfigError(f"the memory per device must be positive, got {memory_bytes} bytes")
    if profile.num_layers < stages - 2:
        raise ConfigError(f"{stages} pipeline stages need at least {stages - 2} decoder layers "
                          f"(every stage but the first and last runs one), the model has "
                          f"{profile.num_layers}; use fewer stages")


def _uniform(search: _Search) -> Simulation | None:
    counts = PipelineLayout.uniform(search.profile.num_layers, search.stages).layers
    return search.simulation(list(counts))


def plan_pipeline(profile: CostProfile, stages: int, micro_batches: int, memory_bytes: int,
                  schedule: str = "1f1b") -> Plan:
    """The layout (layers and recomputed layers per stage) of ``profile``'s model over
    ``stages`` stages with the least simulated step time among those whose every stage fits
    ``memory_bytes``. Raises ``ConfigError`` saying what to change when none fits."""
    _check_shape(profile, stages, micro_batches, memory_bytes, schedule)
    search = _Search(profile, stages, micro_batches, memory_bytes, schedule)
    split = search.bottleneck_split()
    if split is None:
        stage, peak = search.smallest_peak()
        held = search.held[stage]
        raise ConfigError(
            f"no split of {profile.num_layers} layers over {stages} stages fits in "
            f"{format_bytes(memory_bytes)} per device ({schedule}, {micro_batches} "
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
                    memory_bytes: int, schedule: str = "1f1b") -> Plan:
    """Simulate a given layout and compare it with the uniform split; raises ``ConfigError``
    naming the stage and its bytes when a stage does not fit ``memory_bytes``."""
    _check_shape(profile, layout.stages, micro_batches, memory_bytes, schedule)
    sim = simulate(layout, profile, micro_batches, schedule)
    search = _Search(profile, layout.stages, micro_batches, memory_bytes, schedule)
    for s, cost in enumerate(sim.stages):
        if cost.peak <= memory_bytes:
            continue
        layers = layout.stage_layers(s)
        option = search.costs.least_recompute(s, layers.start, layers.stop, memory_bytes)
        hint = (f"recompute {option[0]} of its layers" if option is not None
                else "move layers off it (recomputing all of them is not enough)")
        raise ConfigError(
            f"stage {s} of {layout.describe()} needs {format_bytes(cost.peak)} "
            f"({format_bytes(cost.static)} static + {format_bytes(cost.activation)} "
            f"activations for {sim.in_flight[s]} micro-batch(es) in flight) but a device has "
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
    ``skymoe plan pipeline`` prints)."""
    sim, layout = plan.simulation, plan.layout
    unit, scale = ("GiB", GIB) if plan.memory_bytes >= GIB else ("MiB", 2**20)
    lines = [
        f"{'plan' if plan.planned else 'layout'}: {layout.num_layers} layers over "
        f"{layout.stages} stages, {sim.schedule}, {sim.micro_batches} micro-batches per step",
        f"costs: {plan.source}",
        f"{'stage':>5} {'layers':>8} {'n':>3} {'recompute':>9} {'fwd+bwd ms':>11} "
        f"{'in flight':>9} {'static ' + unit:>10} {'act ' + unit:>8} {'peak ' + unit:>8} "
        f"{'limit ' + unit:>9}",
    ]
    for s, cost in enumerate(sim.stages):
        lines.append(
            f"{s:>5} {_layer_range(layout.stage_layers(s)):>8} {layout.layers[s]:>3} "
            f"{layout.recompute[s]:>9} {(cost.forward + cost.backward) * 1e3:>11.2f} "
            f"{sim.in_flight[s]:>9} {cost.static / scale:>10.2f} {cost.activation / scale:>8.2f} "
            f"{cost.peak / scale:>8.2f} {plan.memory_bytes / scale:>9.2f}")
    lines.append(f"{layout.describe()}: step {sim.step_time * 1e3:.1f} ms, bubble "
                 f"{100 * sim.bubble_fraction:.1f}%")
    if plan.uniform is None:
        counts = PipelineLayout.uniform(layout.num_layers, layout.stages).layers
        lines.append(f"uniform split {','.join(map(str, counts))}: does not fit (some stage "
                     "exceeds the limit even with every layer recomputed)")
    else:
        u = plan.uniform
        lines.append(f"uniform split ({plan.uniform_layout.describe()}): step "
                     f"{u.step_time * 1e3:.1f} ms, bubble {100 * u.bubble_fraction:.1f}%")
        lines.append(f"predicted gain over uniform: {100 * plan.gain:+.1f}% throughput "
                     f"({(sim.step_time - u.step_time) * 1e3:+.1f} ms per step)")
    return "\n".join(lines)
