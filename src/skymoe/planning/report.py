"""The report of a pipeline plan: what ``skymoe plan pipeline`` prints."""

from __future__ import annotations

from ..parallel.pipeline_layout import PipelineLayout
from .cost import GIB
from .search import Plan


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
        rank = sim.rank_of(s)
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
