"""The pipeline schedules skymoe runs, by name: one registry for the runtime, the training
config and the planner.

Each entry names a ``torch.distributed.pipelining`` schedule class (by attribute name, so this
module imports nothing heavy and the config layer can validate names) and how the schedule
places stages on ranks: one stage per rank (``single``), several in a loop (rank r holds r,
r + P, r + 2P, ...: ``loop``), or two in a V (rank r holds r and 2P - 1 - r: ``v``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ScheduleKind:
    """A schedule's torch class name, its stage placement, and whether its forward-only pass
    (``eval()``: validation, the global-batch loss's load count) works."""

    class_name: str
    placement: str  # "single", "loop" or "v"
    forward_only: bool = True

    def torch_class(self) -> type:
        from torch.distributed import pipelining  # heavy: only when a schedule is built

        return getattr(pipelining, self.class_name)


SCHEDULES: dict[str, ScheduleKind] = {
    "1f1b": ScheduleKind("Schedule1F1B", "single"),
    "gpipe": ScheduleKind("ScheduleGPipe", "single"),
    "interleaved-1f1b": ScheduleKind("ScheduleInterleaved1F1B", "loop"),
    "looped-bfs": ScheduleKind("ScheduleLoopedBFS", "loop"),
    "zero-bubble": ScheduleKind("ScheduleInterleavedZeroBubble", "loop"),
    # torch 2.13's eval() of the V schedule still runs its backward actions and fails
    # ("can't steal_bwd_input if this stage doesn't have backward").
    "zbv": ScheduleKind("ScheduleZBVZeroBubble", "v", forward_only=False),
}


def schedule_kind(schedule: str) -> ScheduleKind:
    """The registry entry of ``schedule`` (``ConfigError`` naming the choices otherwise)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; use one of "
                          f"{', '.join(SCHEDULES)}")
    return SCHEDULES[schedule]


def stages_of_rank(schedule: str, rank: int, ranks: int, stages: int) -> list[int]:
    """The pipeline stages ``schedule`` runs on pipeline rank ``rank`` of ``ranks`` when the
    model is cut into ``stages`` stages (raises ``ConfigError`` when they do not fit)."""
    kind = schedule_kind(schedule).placement
    per_rank, extra = divmod(stages, ranks)
    if extra or (kind == "single" and per_rank != 1) or (kind == "v" and per_rank != 2):
        want = {"single": "one stage", "v": "two stages", "loop": "the same number of stages"}
        raise ConfigError(f"the {schedule} schedule runs {want[kind]} per pipeline rank, but "
                          f"the layout has {stages} stages for {ranks} ranks; set "
                          "parallel.pp_stages_per_rank (and parallel.pp_layers) to match")
    if kind == "v":
        return [rank, 2 * ranks - 1 - rank]
    return [rank + k * ranks for k in range(per_rank)]


def rank_of_stage(schedule: str, stage: int, ranks: int, stages: int) -> int:
    """The pipeline rank that runs ``stage`` (the inverse of ``stages_of_rank``)."""
    for rank in range(ranks):
        if stage in stages_of_rank(schedule, rank, ranks, stages):
            return rank
    raise ConfigError(f"stage {stage} is outside the {stages} stages of the layout")
