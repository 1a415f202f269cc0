"""The planner and the runtime share one schedule registry (``skymoe.parallel.schedules``):
every schedule the runtime runs is planned, or refused by name saying why; looped schedules'
orders come from torch and place stages where the registry does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from skymoe.errors import ConfigError
from skymoe.parallel.pipeline_layout import PipelineLayout
from skymoe.parallel.schedules import SCHEDULES, stages_of_rank
from skymoe.planning.cost import CostProfile
from skymoe.planning.orders import (BACKWARD, FORWARD, PLANNABLE, REFUSED, in_flight,
                                    rank_order)
from skymoe.planning.search import evaluate_layout, plan_pipeline
from skymoe.planning.simulate import simulate


def profile(layers: int, act: int = 0, static: int = 0, head_f: float = 0.0,
            head_b: float = 0.0) -> CostProfile:
    """Identical layers (forward 1, backward 2); embedding and head free unless given."""
    return CostProfile(
        layer_forward=[1.0] * layers, layer_backward=[2.0] * layers,
        layer_recompute=[1.0] * layers, layer_activation=[act] * layers,
        layer_checkpoint=[act // 10] * layers, layer_static=[static] * layers,
        embed_forward=0.0, embed_backward=0.0, embed_activation=0, embed_static=0,
        head_forward=head_f, head_backward=head_b, head_activation=0, head_static=0,
        output_bytes=0, p2p_time=0.0, source="synthetic")


def _per_rank(name: str) -> int:
    return 1 if SCHEDULES[name].placement == "single" else 2


def test_every_runtime_schedule_is_planned_or_refused_by_name():
    assert set(PLANNABLE) | set(REFUSED) == set(SCHEDULES)
    assert not set(PLANNABLE) & set(REFUSED)
    assert set(PLANNABLE) == {"1f1b", "gpipe", "interleaved-1f1b", "looped-bfs"}
    for name in SCHEDULES:
        per_rank = _per_rank(name)
        layout = PipelineLayout.uniform(8, 2 * per_rank)
        if name in PLANNABLE:
            sim = simulate(layout, profile(8), 4, name, per_rank)
            assert sim.step_time > 0
            # Each rank runs the stages the registry (and so the runtime) gives it.
            for rank in range(2):
                assert sim.rank_stages(rank) == stages_of_rank(name, rank, 2, 2 * per_rank)
                assert {s for _, s, _ in rank_order(2, 4, name, per_rank)[rank]} == set(
                    sim.rank_stages(rank))
        else:
            with pytest.raises(ConfigError, match=rf"cannot plan the {name} schedule: .*"
                                                  "weight-gradient half"):
                simulate(layout, profile(8), 4, name, per_rank)
            with pytest.raises(ConfigError, match=f"cannot plan the {name} schedule"):
                plan_pipeline(profile(8), 2, 4, 10**9, name, per_rank)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'dualpipe'.*1f1b"):
        rank_order(2, 4, "dualpipe")


@pytest.mark.parametrize("schedule,ranks,per_rank,micro_batches", [
    ("interleaved-1f1b", 2, 2, 4), ("interleaved-1f1b", 4, 2, 10), ("interleaved-1f1b", 3, 3, 3),
    ("looped-bfs", 2, 2, 2), ("looped-bfs", 3, 2, 5), ("looped-bfs", 2, 3, 4)])
def test_order_matches_the_schedule_object(schedule, ranks, per_rank, micro_batches):
    # The real torch schedule, built on stand-in stages (it only reads where they sit),
    # computes the same per-rank order as the planner's call of its method.
    from torch.distributed.pipelining.schedules import _ComputationType
    total = ranks * per_rank
    kinds = {_ComputationType.FORWARD: FORWARD, _ComputationType.FULL_BACKWARD: BACKWARD}
    for rank in range(ranks):
        stages = [SimpleNamespace(group_size=ranks, group_rank=rank, stage_index=s,
                                  num_stages=total, is_first=s == 0, is_last=s == total - 1)
                  for s in range(rank, total, ranks)]
        torch_schedule = SCHEDULES[schedule].torch_class()(stages, micro_batches)
        actions = [a for a in torch_schedule.pipeline_order[rank] if a is not None]
        assert rank_order(ranks, micro_batches, schedule, per_rank)[rank] == tuple(
            (kinds[a.computation_type], a.stage_index, a.microbatch_index) for a in actions)


def test_looped_bfs_two_ranks_by_hand():
    # One layer per stage, f = 1, b = 2, no link time, 2 ranks x 2 stages, 2 micro-batches.
    # Rank 0 runs 0F0 0F1 2F0 2F1 2B1 2B0 0B1 0B0, rank 1 the same on stages 1 and 3:
    #   rank 0: 0F0 [0,1] 0F1 [1,2] 2F0 [2,3] 2F1 [3,4] 2B1 [7,9] 2B0 [9,11] 0B1 [11,13]
    #           0B0 [13,15]
    #   rank 1: 1F0 [1,2] 1F1 [2,3] 3F0 [3,4] 3F1 [4,5] 3B1 [5,7] 3B0 [7,9] 1B1 [9,11]
    #           1B0 [11,13]
    # Step 15; each rank computes 2 stages x 2 x 3 = 12, bubble 3/15. Every stage holds both
    # micro-batches.
    sim = simulate(PipelineLayout((1, 1, 1, 1)), profile(4), 2, "looped-bfs", 2)
    assert sim.step_time == pytest.approx(15.0)
    assert sim.bubble_fraction == pytest.approx(3 / 15)
    assert in_flight(2, 2, "looped-bfs", 2) == [2, 2, 2, 2]


def test_looped_bfs_plan_fits_each_rank():
    prof = profile(8, act=100, static=100, head_f=2.0, head_b=4.0)
    plan = plan_pipeline(prof, 2, 4, 2400, "looped-bfs", 2)
    assert all(peak <= 2400 for peak in plan.simulation.peak_bytes)
    assert plan.simulation.schedule == "looped-bfs" and plan.simulation.ranks == 2
    again = evaluate_layout(plan.layout, prof, 4, 2400, "looped-bfs", 2)
    assert again.simulation.step_time == plan.simulation.step_time


def test_looped_schedules_need_several_stages_per_rank():
    with pytest.raises(ConfigError, match="stages per rank must be >= 2.*use gpipe"):
        simulate(PipelineLayout((2, 2)), profile(4), 4, "looped-bfs", 1)
