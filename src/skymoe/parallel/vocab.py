"""Vocabulary parallelism: an embedding and a cross-entropy over vocabulary shards.

Each TP rank holds rows ``[start, end)`` of the embedding / LM head. The embedding looks up the
ids it owns (zeros for the rest) and sums over the group; the loss combines per-shard maxima,
sums of exponentials and target logits with three small all-reduces, so the full logits are
never gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.loss import IGNORE_INDEX, next_token_labels
from .comm import CommGroup, all_reduce_, reduce_from


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + weight.shape[0])`` of an embedding table, summed over ``group``."""

    def __init__(self, weight: nn.Parameter, start: int, group: CommGroup) -> None:
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from(x.masked_fill(outside[..., None], 0.0), self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over valid targets; the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor, start: int,
                group: CommGroup) -> torch.Tensor:
        x = logits_NV.float()
        valid = labels_N != IGNORE_INDEX
        count = valid.sum().clamp_min(1)
        row_max = all_reduce_(x.amax(dim=-1).detach().clone(), group, dist.ReduceOp.MAX)
        exp = (x - row_max[:, None]).exp_()
        sum_exp = all_reduce_(exp.sum(dim=-1), group)
        local = labels_N - start
        mine = valid & (local >= 0) & (local < x.shape[1])
        rows = torch.arange(x.shape[0], device=x.device)
        target = torch.where(mine, x[rows, local.clamp(0, x.shape[1] - 1)], 0.0)
        target = all_reduce_(target, group)
        loss = ((row_max + sum_exp.log() - target) * valid).sum() / count
        if logits_NV.requires_grad:
            grad = exp.div_(sum_exp[:, None])
            grad[rows[mine], local[mine]] -= 1.0
            ctx.save_for_backward((grad * (valid.float() / count)[:, None]).to(logits_NV.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None


class VocabParallelLoss:
    """Next-token loss for vocabulary-sharded logits [B, T, V_local] (the model's
    ``loss_function`` under tensor parallelism)."""

    def __init__(self, start: int, group: CommGroup) -> None:
        self.start, self.group = start, group

    def __call__(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        return _VocabParallelCrossEntropy.apply(logits_BTV.reshape(-1, logits_BTV.shape[-1]),
                                                next_token_labels(labels_BT), self.start,
                                                self.group)
