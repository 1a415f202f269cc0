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

from ..errors import ConfigError
from ..model.moe import MoEBalance, MoEStats, accumulate_stats
from ..model.transformer import SkyworkForCausalLM
from ..parallel.comm import all_reduce_
from ..parallel.data_parallel import DataParallel
from ..parallel.pipeline import PipelineSchedule
from .batch import Batch
from .metrics import MoEStepStats


class StepStrategy(Protocol):
    """How a rank's rows become gradients: returns the (loss, CE loss) sums of the rows (a
    float64 tensor of 2) and every MoE layer's statistics. ``ce_per_token`` weighs the CE of
    each next-token prediction (so a micro-batch's mean CE counts with its number of label
    tokens: the step's loss is the mean over every label token of the step, however the rows
    are split over micro-batches and ranks)."""

    def forward_backward(self, local_batch: Batch, balance: MoEBalance | None,
                         ce_per_token: float) -> tuple[torch.Tensor, dict[int, MoEStats]]: ...

    def expert_loads(self, local_batch: Batch, balance: MoEBalance
                     ) -> dict[int, torch.Tensor]:
        """Every MoE layer's assignments per expert over the rank's rows, by a forward-only
        pass in training mode (the counts the step's forwards will route)."""
        ...

    @property
    def eval_rows(self) -> int:
        """How many rows ``loss_sums`` takes at a time."""
        ...

    def loss_sums(self, batch: Batch) -> torch.Tensor:
        """(sum of CE over label tokens, label tokens) of an evaluation batch (forward
        only)."""
        ...


class MicroBatchLoop:
    """The step strategy without pipeline parallelism: the rank's rows in micro-batches of
    ``micro_batch_size`` through the whole model; each micro-batch's CE weighed by its label
    tokens (``ce_per_token``), its MoE aux terms by its share of the rows."""

    def __init__(self, model: SkyworkForCausalLM, micro_batch_size: int,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 device: torch.device) -> None:
        self.model, self.micro_batch_size = model, micro_batch_size
        self.autocast, self.device = autocast, device

    def _micro_batches(self, local_batch: Batch) -> list[Batch]:
        return local_batch.split(min(self.micro_batch_size, len(local_batch)))

    def _forward(self, micro: Batch, balance: MoEBalance | None, labels: bool = True):
        with self.autocast():
            return self.model(micro.input_ids, labels=micro.target if labels else None,
                              position_ids=micro.position_ids, balance=balance)

    def forward_backward(self, local_batch: Batch, balance: MoEBalance | None,
                         ce_per_token: float) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        sums = torch.zeros(2, dtype=torch.float64)
        stats: dict[int, MoEStats] = {}
        for micro in self._micro_batches(local_batch):
            micro = micro.to(self.device)
            share = len(micro) / len(local_batch)
            ce_weight = micro.label_tokens() * ce_per_token
            out = self._forward(micro, balance)
            loss = out.loss * ce_weight
            aux = out.aux_loss * share if out.aux_loss is not None else None
            (loss + aux if aux is not None else loss).backward()
            accumulate_stats(stats, out.moe_stats or {})
            ce = float(loss.detach())
            sums += torch.tensor([ce + (float(aux.detach()) if aux is not None else 0.0), ce],
                                 dtype=torch.float64)
        return sums, stats

    @torch.no_grad()
    def expert_loads(self, local_batch: Batch, balance: MoEBalance
                     ) -> dict[int, torch.Tensor]:
        stats: dict[int, MoEStats] = {}
        for micro in self._micro_batches(local_batch):
            out = self._forward(micro.to(self.device), balance, labels=False)
            accumulate_stats(stats, out.moe_stats or {})
        return {i: s.load for i, s in stats.items()}

    @property
    def eval_rows(self) -> int:
        return self.micro_batch_size

    def loss_sums(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        tokens = batch.label_tokens()
        loss = float(self._forward(batch, None).loss) if tokens else 0.0
        return torch.tensor([loss * tokens, tokens], dtype=torch.float64)


class PipelineSteps:
    """The step strategy under pipeline parallelism: ``PipelineSchedule`` (which takes token
    and label tensors) for batches. Packed rows (``position_ids``) cannot pass the stage
    boundaries, which carry hidden states only; fine-tuning data goes one sample per row."""

    def __init__(self, schedule: PipelineSchedule) -> None:
        self.schedule = schedule

    @staticmethod
    def _unpacked(batch: Batch) -> Batch:
        if batch.position_ids is not None:
            raise ConfigError("packed fine-tuning rows cannot run through a pipeline; set "
                              "data.pack = false (one sample per row) with parallel.pp > 1")
        return batch

    def forward_backward(self, local_batch: Batch, balance: MoEBalance | None,
                         ce_per_token: float) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        b = self._unpacked(local_batch)
        return self.schedule.forward_backward(b.input_ids, b.target, balance, ce_per_token)

    def expert_loads(self, local_batch: Batch, balance: MoEBalance
                     ) -> dict[int, torch.Tensor]:
        return self.schedule.expert_loads(self._unpacked(local_batch).input_ids, balance)

    @property
    def eval_rows(self) -> int:
        return self.schedule.eval_rows

    def loss_sums(self, batch: Batch) -> torch.Tensor:
        b = self._unpacked(batch)
        return self.schedule.loss_sums(b.input_ids, b.target)


def accumulate_gradients(strategy: StepStrategy, local_batch: Batch | torch.Tensor,
                         balance: MoEBalance | None, dp: DataParallel, stats: MoEStepStats
                         ) -> tuple[float, float]:
    """Fill ``.grad`` with the step's gradient (reduced over the replica groups) and
    ``stats`` with the step's MoE statistics for the rank's rows (a ``Batch``, or token rows
    that are their own labels); returns the step's (loss, CE loss), averaged over every
    data-parallel rank.

    The step's label tokens are counted over the data-parallel ranks first, so the CE is the
    mean over all of them (rows of fine-tuning data differ in how many tokens they train).
    For the global-batch balance loss a forward-only pass first counts the step's expert loads
    (summed over the data-parallel ranks), which the step's forwards then use.
    """
    local_batch = Batch.of(local_batch)
    tokens = torch.tensor([float(local_batch.label_tokens())], dtype=torch.float64)
    all_reduce_(tokens, dp.mesh.dp)
    ce_per_token = dp.mesh.layout.dp / max(float(tokens), 1.0)
    if balance is not None and balance.needs_global_loads:
        balance = balance.with_global_loads(step_expert_loads(strategy, local_batch, balance, dp))
    sums, moe = strategy.forward_backward(local_batch, balance, ce_per_token)
    stats.add(moe)
    dp.reduce_gradients()
    stats.apply_(lambda t: all_reduce_(t, dp.mesh.dp))
    all_reduce_(sums, dp.mesh.dp).div_(dp.mesh.layout.dp)
    total, ce_total = sums.tolist()
    return total, ce_total


def step_expert_loads(strategy: StepStrategy, local_batch: Batch, balance: MoEBalance,
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
