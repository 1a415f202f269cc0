"""Bytes a rank sends per training step under a layout, predicted from the model config.

The prediction enumerates the collectives that the parallel code issues in one step (forward,
backward, gradient reduction, ZeRO-1 broadcast, metrics) and prices each with
``comm.collective_bytes``, the same formula the live counters use, so a measured step on a
small config checks the model before it is applied to configs too large to run (the real
Skywork-MoE). Assumptions: bf16 autocast over fp32 master weights (fp32 residual stream,
matmul outputs and the token exchange in bf16), tokens spread evenly over experts, a given
drop rate, and rank 0's shard sizes (uneven splits differ by one head or row at most).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ..arithmetic import rank_shard
from ..config import SkyworkMoeConfig
from .comm import collective_bytes
from .layout import ParallelLayout, split_sizes

FP32, BF16, INT64 = 4, 2, 8


@dataclass
class StepShape:
    """The work of one optimizer step on one data-parallel rank."""

    seq_len: int
    micro_batch: int          # sequences per forward on this rank
    micro_batches: int = 1    # gradient accumulation
    drop_rate: float = 0.0    # fraction of assignments dropped by capacity
    zero: bool = True


def _local_param_bytes(config: SkyworkMoeConfig, layout: ParallelLayout) -> tuple[int, int]:
    """(dense, expert) fp32 bytes of rank 0's parameters (``skymoe.arithmetic``)."""
    shard = rank_shard(config, layout, 0)
    return shard.dense * FP32, shard.expert * FP32


def step_traffic(config: SkyworkMoeConfig, layout: ParallelLayout,
                 shape: StepShape) -> dict[str, float]:
    """Predicted bytes rank 0 sends in one step, per collective kind."""
    out: dict[str, float] = defaultdict(float)

    def add(kind: str, nbytes: float, group: int, times: int = 1) -> None:
        out[kind] += times * collective_bytes(kind, nbytes, group)

    c, tp, ep, etp = config, layout.tp, layout.ep, layout.etp
    tokens = shape.micro_batch * shape.seq_len  # per DP rank, replicated over its TP group
    h, k = c.hidden_size, c.num_experts_per_tok
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    dense_layers = c.num_hidden_layers - moe_layers
    for _ in range(shape.micro_batches):
        if tp > 1:
            add("all_reduce", tokens * h * FP32, tp)           # vocab-parallel embedding
            add("all_reduce", tokens * h * FP32, tp)           # LM head input gradient
            add("all_reduce", tokens * FP32, tp, times=3)      # vocab-parallel loss
            # attention (and dense MLPs): output sum forward, input gradient backward
            add("all_reduce", tokens * h * BF16, tp, times=c.num_hidden_layers + dense_layers)
            add("all_reduce", tokens * h * FP32, tp, times=c.num_hidden_layers + dense_layers)
        if not moe_layers or (ep == 1 and etp == 1 and tp == 1):
            continue
        local = split_sizes(tokens, tp)[0] if layout.slices_tokens else tokens
        if layout.slices_tokens:
            # tokens split over TP before dispatch, outputs gathered after; gradients reverse
            add("all_gather", local * h * FP32, tp, times=2 * moe_layers)  # y fwd, x grad bwd
            add("all_gather", local * k * FP32, tp, times=moe_layers)      # gate weights bwd
        if ep > 1:
            per_expert_rank = c.num_experts // ep
            add("all_to_all", per_expert_rank * INT64 * (ep - 1), ep, times=moe_layers)
            kept = local * k * (1.0 - shape.drop_rate)
            to_others = kept * (ep - 1) / ep
            # dispatch and combine, forward and backward
            add("all_to_all", to_others * h * BF16, ep, times=4 * moe_layers)
        if etp > 1:
            received = local * k * (1.0 - shape.drop_rate)
            add("all_reduce", received * h * BF16, etp, times=2 * moe_layers)
    # per step: gradients over replica groups, ZeRO-1 broadcast, metrics and loss
    dense_bytes, expert_bytes = _local_param_bytes(c, layout)
    for nbytes, group in ((dense_bytes, layout.dp), (expert_bytes, layout.edp)):
        if shape.zero:
            add("reduce", nbytes, group)
            add("broadcast", nbytes, group)
        else:
            add("all_reduce", nbytes, group)
    if layout.dp > 1:
        stats = [FP32] * 6 + [c.num_experts * FP32]  # per MoE layer, see MoEStepStats
        for nbytes in stats:
            add("all_reduce", nbytes, layout.dp, times=moe_layers)
        add("all_reduce", 2 * 8, layout.dp)  # loss sums (fp64)
    add("all_reduce", 8, layout.world_size)  # gradient norm (fp64)
    return dict(out)
