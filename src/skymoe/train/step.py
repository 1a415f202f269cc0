"""The collective parts of one optimizer step, shared by the trainer and the benchmarks.

A step on a data-parallel rank: its rows of the global batch through a step strategy, which
fills ``.grad`` with the gradient of the rank's mean loss (CE + the MoE aux terms), either by
running micro-batches through the whole model (``MicroBatchLoop``) or by a pipeline schedule
over the rank's stages (``skymoe.parallel.pipeline.PipelineSchedule``); then gradients reduced
over the replica groups, MoE statistics and losses summed over DP (so every rank sees the whole
step), and after the caller's checks, the update and the ZeRO-1 broadcast. With one process
every collective is a no-op.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Protocol

import torch

from ..model.moe import MoEBalance, MoEStats, accumulate_stats
from ..model.transformer import SkyworkForCausalLM
from ..parallel.comm import all_reduce_
from ..parallel.data_parallel import DataParallel
from .metrics import MoEStepStats


class StepStrategy(Protocol):
    """How a rank's rows become gradients: returns the (loss, CE loss) sums of the rows (a
    float64 tensor of 2) and every MoE layer's statistics."""

    def forward_backward(self, local_batch: torch.Tensor, balance: MoEBalance | None
                         ) -> tuple[torch.Tensor, dict[int, MoEStats]]: ...

    def expert_loads(self, local_batch: torch.Tensor, balance: MoEBalance
                     ) -> dict[int, torch.Tensor]:
        """Every MoE layer's assignments per expert over the rank's rows, by a forward-only
        pass in training mode (the counts the step's forwards will route)."""
        ...

    @property
    def eval_rows(self) -> int:
        """How many rows ``loss_sums`` takes at a time."""
        ...

    def loss_sums(self, batch: torch.Tensor) -> torch.Tensor:
        """(sum of loss * sequences, sequences) of an evaluation batch (forward only)."""
        ...


class MicroBatchLoop:
    """The step strategy without pipeline parallelism: the rank's rows in micro-batches of
    ``micro_batch_size`` through the whole model, each loss scaled by its share of the rows so
    the gradient is that of their mean loss."""

    def __init__(self, model: SkyworkForCausalLM, micro_batch_size: int,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 device: torch.device) -> None:
        self.model, self.micro_batch_size = model, micro_batch_size
        self.autocast, self.device = autocast, device

    def _micro_batches(self, local_batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return local_batch.split(min(self.micro_batch_size, local_batch.shape[0]))

    def forward_backward(self, local_batch: torch.Tensor, balance: MoEBalance | None
                         ) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        sums = torch.zeros(2, dtype=torch.float64)
        stats: dict[int, MoEStats] = {}
        for micro in self._micro_batches(local_batch):
            micro = micro.to(self.device)
            share = micro.shape[0] / local_batch.shape[0]
            with self.autocast():
                out = self.model(micro, labels=micro, balance=balance)
            loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
            (loss * share).backward()
            accumulate_stats(stats, out.moe_stats or {})
            sums += torch.tensor([float(loss.detach()), float(out.loss.detach())]) * share
        return sums, stats

    @torch.no_grad()
    def expert_loads(self, local_batch: torch.Tensor, balance: MoEBalance
                     ) -> dict[int, torch.Tensor]:
        stats: dict[int, MoEStats] = {}
        for micro in self._micro_batches(local_batch):
            with self.autocast():
                out = self.model(micro.to(self.device), balance=balance)
            accumulate_stats(stats, out.moe_stats or {})
        return {i: s.load for i, s in stats.items()}

    @property
    def eval_rows(self) -> int:
        return self.micro_batch_size

    def loss_sums(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        with self.autocast():
            loss = float(self.model(batch, labels=batch).loss)
        return torch.tensor([loss * batch.shape[0], batch.shape[0]], dtype=torch.float64)


def accumulate_gradients(strategy: StepStrategy, local_batch: torch.Tensor,
                         balance: MoEBalance | None, dp: DataParallel, stats: MoEStepStats
                         ) -> tuple[float, float]:
    """Fill ``.grad`` with the step's gradient (reduced over the replica groups) and
    ``stats`` with the step's MoE statistics; returns the step's (loss, CE loss), averaged
    over every data-parallel rank.

    For the global-batch balance loss a forward-only pass first counts the step's expert loads
    (summed over the data-parallel ranks), which the step's forwards then use.
    """
    if balance is not None and balance.needs_global_loads:
        balance = balance.with_global_loads(step_expert_loads(strategy, local_batch, balance, dp))
    sums, moe = strategy.forward_backward(local_batch, balance)
    stats.add(moe)
    dp.reduce_gradients()
    stats.apply_(lambda t: all_reduce_(t, dp.mesh.dp))
    all_reduce_(sums, dp.mesh.dp).div_(dp.mesh.layout.dp)
    total, ce_total = sums.tolist()
    return total, ce_total


def step_expert_loads(strategy: StepStrategy, local_batch: torch.Tensor, balance: MoEBalance,
                      dp: DataParallel) -> dict[int, torch.Tensor]:
    """Each MoE layer's expert load over the whole step: the rank's counts, summed over the
    data-parallel ranks layer by layer in one fixed order."""
    counting = replace(balance, options=replace(balance.options, aux_loss="switch"))
    loads = strategy.expert_loads(local_batch, counting)
    for layer in sorted(loads):
        all_reduce_(loads[layer], dp.mesh.dp)
    return loads


def apply_update(optimizer: torch.optim.Optimizer, dp: DataParallel, lr: float) -> None:
    """The AdamW update at ``lr`` (owners only, with ZeRO-1), then every rank gets the
    updated weights."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    dp.broadcast_parameters()
