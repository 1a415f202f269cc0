"""The order in which each pipeline rank runs its forwards and backwards under a schedule of
the registry (``skymoe.parallel.schedules``, shared with the runtime), as the simulation
(``skymoe.planning.simulate``) replays it.

P pipeline ranks run P * V stages, placed on ranks as the registry says (``stages_of_rank``).
An operation is ``(FORWARD or BACKWARD, stage, micro-batch)``, stages numbered over the whole
pipeline:

- ``1f1b`` (``Schedule1F1B``, V = 1): stage s runs min(P - s, M) forwards, then alternates
  one backward and one forward until the forwards run out, then the remaining backwards; it
  holds up to min(P - s, M) micro-batches of activations;
- ``gpipe`` (``ScheduleGPipe``, V = 1): all M forwards, then all M backwards; it holds M;
- ``interleaved-1f1b`` (``ScheduleInterleaved1F1B``) and ``looped-bfs``
  (``ScheduleLoopedBFS``), V >= 2 stages in a loop: the order torch computes for each rank,
  taken from torch itself (``_torch_orders``).

The zero-bubble schedules (``REFUSED``) are refused by name: they split each backward into
an input-gradient and a weight-gradient half that a cost profile does not time separately.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

from ..errors import ConfigError
from ..parallel.schedules import SCHEDULES, schedule_kind, stages_of_rank

FORWARD, BACKWARD = 0, 1

_SPLIT_BACKWARD = ("splits every backward into an input-gradient and a weight-gradient half "
                   "(torch's BACKWARD_INPUT / BACKWARD_WEIGHT) run at different times; the "
                   "planner's cost profile times a layer's backward as one piece and its "
                   "simulation runs full backwards only")
REFUSED: dict[str, str] = {
    "zero-bubble": _SPLIT_BACKWARD,
    "zbv": _SPLIT_BACKWARD,
}
PLANNABLE: tuple[str, ...] = tuple(name for name in SCHEDULES if name not in REFUSED)
# With one stage per rank a looped schedule is the single-stage one to use instead.
_ONE_STAGE_INSTEAD = {"interleaved-1f1b": "1f1b", "looped-bfs": "gpipe"}


def check_plannable(schedule: str) -> None:
    """Raise ``ConfigError`` when the planner cannot plan ``schedule`` at all: not in the
    registry, or refused (saying why)."""
    schedule_kind(schedule)
    if schedule in REFUSED:
        raise ConfigError(f"the pipeline planner cannot plan the {schedule} schedule: it "
                          f"{REFUSED[schedule]}; plan with one of {', '.join(PLANNABLE)}")


def check_schedule(schedule: str, ranks: int, micro_batches: int,
                   stages_per_rank: int) -> None:
    """Raise ``ConfigError`` saying what to change when the planner cannot run ``schedule``
    (by name: unknown, or refused and why) over ``ranks`` x ``stages_per_rank`` stages with
    ``micro_batches`` micro-batches per step."""
    check_plannable(schedule)
    placement = schedule_kind(schedule).placement
    if ranks < 1:
        raise ConfigError(f"the number of pipeline ranks must be >= 1, got {ranks}")
    if micro_batches < 1:
        raise ConfigError(f"the number of micro-batches must be >= 1, got {micro_batches}")
    if placement == "loop":
        if stages_per_rank < 2:
            raise ConfigError(f"the {schedule} schedule runs several stages per pipeline rank; "
                              f"stages per rank must be >= 2, got {stages_per_rank} (use "
                              f"{_ONE_STAGE_INSTEAD.get(schedule, '1f1b')} for one stage per "
                              "rank)")
        if schedule == "interleaved-1f1b":
            rounds = max(1, micro_batches // ranks)
            if micro_batches % rounds:
                raise ConfigError(
                    f"the {schedule} schedule with {ranks} pipeline ranks needs a number of "
                    f"micro-batches divisible by max(1, micro-batches // ranks) = {rounds}, "
                    f"got {micro_batches} (torch's ScheduleInterleaved1F1B); use a multiple "
                    f"of {ranks}")
        return
    if stages_per_rank != 1:
        raise ConfigError(f"the {schedule} schedule runs one stage per pipeline rank, got "
                          f"{stages_per_rank} stages per rank; use 1 or a looped schedule "
                          "(interleaved-1f1b, looped-bfs)")
    if schedule == "1f1b" and micro_batches < ranks:
        raise ConfigError(f"the 1f1b schedule needs at least as many micro-batches per step "
                          f"({micro_batches}) as pipeline stages ({ranks}) (torch's "
                          "Schedule1F1B); use more micro-batches or the gpipe schedule")


@lru_cache(maxsize=64)
def stage_ranks(schedule: str, ranks: int, stages_per_rank: int) -> tuple[int, ...]:
    """The pipeline rank of every stage (the registry's placement)."""
    stages = ranks * stages_per_rank
    owner = [0] * stages
    for rank in range(ranks):
        for s in stages_of_rank(schedule, rank, ranks, stages):
            owner[s] = rank
    return tuple(owner)


@lru_cache(maxsize=64)
def rank_stages(schedule: str, ranks: int, stages_per_rank: int) -> tuple[tuple[int, ...], ...]:
    """Per pipeline rank, its stages in the registry's order."""
    stages = ranks * stages_per_rank
    return tuple(tuple(stages_of_rank(schedule, r, ranks, stages)) for r in range(ranks))


def _one_stage_order(stage: int, stages: int, micro_batches: int,
                     schedule: str) -> tuple[tuple[int, int, int], ...]:
    """Schedule1F1B's or ScheduleGPipe's order of one stage (it is its rank's order), as
    their ``_step_microbatches`` run it."""
    forwards = [(FORWARD, stage, m) for m in range(micro_batches)]
    backwards = [(BACKWARD, stage, m) for m in range(micro_batches)]
    if schedule == "gpipe":
        return tuple(forwards + backwards)
    warmup = min(micro_batches, stages - stage)
    ops = forwards[:warmup]
    for m in range(micro_batches - warmup):  # steady state: one backward, one forward
        ops += [backwards[m], forwards[warmup + m]]
    return tuple(ops + backwards[micro_batches - warmup:])


def _torch_orders(schedule: str, ranks: int, stages_per_rank: int, micro_batches: int) -> tuple[
        tuple[tuple[int, int, int], ...], ...]:
    """The order of every rank as torch's looped schedule class computes it, so the simulation
    follows the runtime exactly. This reads a private torch API, here only: the class's
    ``_calculate_single_rank_operations(self, rank)``, called on the few attributes it reads
    (``ScheduleInterleaved1F1B``: n_local_stages, pp_group_size, microbatches_per_round,
    _n_microbatches; ``ScheduleLoopedBFS``: _stages, pp_group_size, _n_microbatches).
    Checked against torch 2.13; tests/test_planning_schedules.py compares it with real
    schedule objects."""
    try:
        from torch.distributed.pipelining.schedules import _ComputationType

        cls = schedule_kind(schedule).torch_class()
        kinds = {_ComputationType.FORWARD: FORWARD, _ComputationType.FULL_BACKWARD: BACKWARD}
        rounds = max(1, micro_batches // ranks)
        state = SimpleNamespace(n_local_stages=stages_per_rank, pp_group_size=ranks,
                                microbatches_per_round=micro_batches // rounds,
                                _n_microbatches=micro_batches, _stages=[None] * stages_per_rank)
        orders = tuple(tuple((kinds[a.computation_type], a.stage_index, a.microbatch_index)
                             for a in cls._calculate_single_rank_operations(state, r)
                             if a is not None) for r in range(ranks))
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"cannot simulate the {schedule} schedule: this torch's "
            f"{schedule_kind(schedule).class_name}._calculate_single_rank_operations (a private "
            f"API the planner reads the order from) is missing or changed ({exc!r}); plan with "
            "torch 2.13 or use the 1f1b or gpipe schedule") from None
    placed = rank_stages(schedule, ranks, stages_per_rank)
    for r, ops in enumerate(orders):
        if any(s not in placed[r] for _, s, _ in ops):
            raise ConfigError(f"torch's {schedule} order runs stages on rank {r} that "
                              "skymoe.parallel.schedules places elsewhere; the registry and "
                              "this torch disagree")
    return orders


@lru_cache(maxsize=64)
def rank_order(ranks: int, micro_batches: int, schedule: str, stages_per_rank: int = 1) -> tuple[
        tuple[tuple[int, int, int], ...], ...]:
    """Per pipeline rank, its operations in execution order: ``(FORWARD or BACKWARD, stage,
    micro-batch)``, stages numbered over the whole pipeline."""
    check_schedule(schedule, ranks, micro_batches, stages_per_rank)
    if schedule_kind(schedule).placement != "single":
        return _torch_orders(schedule, ranks, stages_per_rank, micro_batches)
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
def holdings(ranks: int, micro_batches: int, schedule: str, stages_per_rank: int) -> tuple[
        tuple[tuple[int, ...], ...], ...]:
    """Per rank, the micro-batches in flight on each of its stages (in ``rank_stages`` order)
    at every moment that may be its memory peak: after each forward, keeping only the vectors
    no other one covers (the peak over any kept bytes per stage is reached at one of them)."""
    out = []
    placed = rank_stages(schedule, ranks, stages_per_rank)
    for r, ops in enumerate(rank_order(ranks, micro_batches, schedule, stages_per_rank)):
        local = {s: i for i, s in enumerate(placed[r])}
        held, seen = [0] * stages_per_rank, set()
        for kind, s, _ in ops:
            held[local[s]] += 1 if kind == FORWARD else -1
            if kind == FORWARD:
                seen.add(tuple(held))
        out.append(tuple(v for v in seen if not any(
            w != v and all(a >= b for a, b in zip(w, v)) for w in seen)))
    return tuple(out)
