"""Planning: what a training pipeline or a serving deployment will cost, from the config.

- ``orders``: each pipeline rank's forward/backward order under a schedule of the registry
  shared with the runtime (``skymoe.parallel.schedules``); which schedules can be planned;
- ``cost``: ``CostProfile`` (per-layer time and bytes of one micro-batch), device presets and
  the analytical profile; ``measure``: the profile measured on this machine;
- ``stages``: a stage's cost from the profile (its layers, some recomputed);
- ``simulate``: the event simulation of one training step;
- ``search``: ``plan_pipeline`` (one dynamic program over contiguous splits + local search)
  and ``evaluate_layout``; ``report``: the printed plan;
- ``serving``: the tensor-parallel serving planner (``plan_serve``).

Model arithmetic (parameter counts, shard sizes, FLOPs, weight bytes) is ``skymoe.arithmetic``.
"""
