"""The collective parts of one optimizer step, shared by the trainer and the benchmarks.

A step on a data-parallel rank: its rows of the global batch in micro-batches, each loss
(CE + the MoE aux terms) scaled by its share so the gradient is that of the rank's mean loss;
then gradients reduced over the replica groups, MoE statistics and losses summed over DP (so
every rank sees the whole step), and after the caller's checks, the update and the ZeRO-1
broadcast. With one process every collective is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from ..parallel.comm import all_reduce_
from ..parallel.data_parallel import DataParallel
from ..parallel.pipeline import PipelineStageModel
from .metrics import MoEStepStats


def accumulate_gradients(model: torch.nn.Module, local_batch: torch.Tensor,
                         micro_batch_size: int, dp: DataParallel, stats: MoEStepStats,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         device: torch.device) -> tuple[float, float]:
    """Fill ``.grad`` with the step's gradient; returns the step's (loss, CE loss), averaged
    over every data-parallel rank."""
    sums = torch.zeros(2, dtype=torch.float64)
    for micro in local_batch.split(min(micro_batch_size, local_batch.shape[0])):
        micro = micro.to(device)
        share = micro.shape[0] / local_batch.shape[0]
        with autocast():
            out = model(micro, labels=micro)
        loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
        (loss * share).backward()
        stats.add(out.moe_stats)
        sums += torch.tensor([float(loss.detach()), float(out.loss.detach())]) * share
    return _reduce_over_replicas(dp, stats, sums)


def pipeline_accumulate_gradients(schedule: PipelineScheduleSingle | PipelineScheduleMulti,
                                  stage: PipelineStageModel, local_batch: torch.Tensor,
                                  micro_batches: int, moe_layers: list[int], dp: DataParallel,
                                  stats: MoEStepStats, device: torch.device
                                  ) -> tuple[float, float]:
    """The same as ``accumulate_gradients`` for one pipeline rank: the schedule runs the
    data-parallel rank's rows as ``micro_batches`` equal micro-batches (the rank holding the
    first stage feeds the tokens, the one holding the last computes the loss); losses and MoE
    statistics are then summed over the pipeline ranks."""
    stage.reset_step()
    micro_losses: list[torch.Tensor] = []
    batch = local_batch.to(device)
    schedule.step(*((batch,) if stage.is_first else ()),
                  target=batch if stage.is_last else None,
                  losses=micro_losses if stage.is_last else None, return_outputs=False)
    stage.sync_tied_gradients()
    ce = sum(float(loss.detach()) for loss in micro_losses) / micro_batches
    sums = torch.tensor([ce + float(stage.step_aux) / micro_batches, ce], dtype=torch.float64)
    pp = dp.mesh.pp
    all_reduce_(sums, pp)
    if moe_layers:
        stats.add(stage.all_layer_stats(moe_layers))
        stats.apply_(lambda t: all_reduce_(t, pp))
    return _reduce_over_replicas(dp, stats, sums)


def _reduce_over_replicas(dp: DataParallel, stats: MoEStepStats, sums: torch.Tensor
                          ) -> tuple[float, float]:
    """Gradients reduced over the replica groups, statistics summed and (loss, CE) averaged
    over data-parallel ranks."""
    dp.reduce_gradients()
    stats.apply_(lambda t: all_reduce_(t, dp.mesh.dp))
    all_reduce_(sums, dp.mesh.dp).div_(dp.mesh.layout.dp)
    total, ce_total = sums.tolist()
    return total, ce_total


def apply_update(optimizer: torch.optim.Optimizer, dp: DataParallel, lr: float) -> None:
    """The AdamW update at ``lr`` (owners only, with ZeRO-1), then every rank gets the
    updated weights."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    dp.broadcast_parameters()
