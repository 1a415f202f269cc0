"""Data parallelism: gradient reduction over DP (dense weights) and EDP (expert weights), the
global gradient norm, and ZeRO-1 (each replica group splits the optimizer state).

Every rank computes the gradient of its own micro-batches' mean loss; the step's gradient is
the mean over the DP ranks. A dense weight is replicated over the DP group; an expert weight
over the expert-data-parallel group, whose token exchange already summed the contributions of
the other ranks of its EP group. So both are *summed* over their replica group and divided by
the DP size. A weight held whole by every rank of a TP (ETP) group whose gradient each rank
computes only in part (a LoRA factor beside a split weight: ``Placement.partial_grad``) is
first summed over that group.

With ZeRO-1 every weight has one owner in its replica group (parameters assigned greedily by
size, the same on every rank): gradients are reduced onto the owner only, the owner keeps the
AdamW state and updates the weight, then broadcasts it. Other ranks drop the gradient, so the
optimizer never creates state for weights they do not own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .comm import CommGroup, all_reduce_, broadcast_, reduce_
from .mesh import ParallelMesh
from .placement import Placement

BUCKET_BYTES = 64 << 20  # flatten at most this much per collective


@dataclass
class ReplicatedParam:
    name: str
    param: nn.Parameter
    placement: Placement
    group: CommGroup  # the ranks holding the same values
    owner: int        # group rank that holds its optimizer state


def assign_owners(sizes: list[int], ranks: int) -> list[int]:
    """Greedy balanced assignment of items (largest first) to ``ranks`` owners; ties go to the
    lowest rank, so every rank computes the same answer."""
    load = [0] * ranks
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


def _buckets(items: list[ReplicatedParam]) -> list[list[ReplicatedParam]]:
    out: list[list[ReplicatedParam]] = []
    size = BUCKET_BYTES
    for item in items:
        nbytes = item.param.numel() * item.param.element_size()
        if size + nbytes > BUCKET_BYTES and (not out or out[-1]):
            out.append([])
            size = 0
        out[-1].append(item)
        size += nbytes
    return out


def _flat_gradients(bucket: list[ReplicatedParam]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The bucket's gradients (zeros where none) in one flat tensor, and the gradients."""
    grads = [it.param.grad if it.param.grad is not None else torch.zeros_like(it.param)
             for it in bucket]
    return _flatten_dense_tensors(grads), grads


class DataParallel:
    """Gradient reduction, norm and (ZeRO-1) parameter broadcast for a sharded model.

    ``placements`` maps parameter names to this rank's placements (``parameter_placements``
    computed on the full model); frozen parameters are left out. ``full_numel`` gives each
    name's unsharded size, which decides ownership identically on every rank.
    ``counted_elsewhere``: parameters whose gradient another rank's copy already counts in the
    norm.
    """

    def __init__(self, model: nn.Module, mesh: ParallelMesh, placements: dict[str, Placement],
                 full_numel: dict[str, int], zero: bool = True,
                 counted_elsewhere: frozenset[str] = frozenset()) -> None:
        self.mesh, self.zero, self.dp_size = mesh, zero, mesh.layout.dp
        # Copies of a weight another rank also holds (a tied LM head on the last pipeline
        # stage): updated here, left out of the gradient norm.
        self.counted_elsewhere = counted_elsewhere
        self.items: list[ReplicatedParam] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:  # frozen (a LoRA base): no gradient, no update
                continue
            part = placements[name]
            self.items.append(ReplicatedParam(name, p, part,
                                              mesh.edp if part.expert else mesh.dp, 0))
        for expert in (False, True):
            members = [it for it in self.items if it.placement.expert == expert]
            if members and zero:
                group_size = members[0].group.size
                for it, owner in zip(members, assign_owners([full_numel[it.name] for it in members],
                                                            group_size)):
                    it.owner = owner

    def owns(self, item: ReplicatedParam) -> bool:
        return not self.zero or item.owner == item.group.rank

    def _groups(self) -> list[list[ReplicatedParam]]:
        """Parameters sharing (replica group, owner), in model order."""
        keyed: dict[tuple[bool, int], list[ReplicatedParam]] = {}
        for it in self.items:
            keyed.setdefault((it.placement.expert, it.owner), []).append(it)
        return list(keyed.values())

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum gradients over each replica group and divide by the DP size (onto the owner
        only, with ZeRO-1; other ranks' gradients become None)."""
        self._sum_partial_gradients()
        for members in self._groups():
            group, owner = members[0].group, members[0].owner
            for bucket in _buckets(members):
                flat, grads = _flat_gradients(bucket)
                if self.zero:
                    reduce_(flat, owner, group)
                else:
                    all_reduce_(flat, group)
                flat.div_(self.dp_size)
                keep = not self.zero or group.rank == owner
                for it, g in zip(bucket, _unflatten_dense_tensors(flat, grads)):
                    it.param.grad = g if keep else None

    def _sum_partial_gradients(self) -> None:
        """Complete the partial gradients: sum them over the TP group (ETP for experts)."""
        for expert, group in ((False, self.mesh.tp), (True, self.mesh.etp)):
            members = [it for it in self.items
                       if it.placement.partial_grad and it.placement.expert == expert]
            if not members or not group.active:
                continue
            for bucket in _buckets(members):
                flat, grads = _flat_gradients(bucket)
                all_reduce_(flat, group)
                for it, g in zip(bucket, _unflatten_dense_tensors(flat, grads)):
                    it.param.grad = g

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of the whole model's (reduced) gradient, the same on every rank: each
        element counted once (by its owner; TP-replicated weights on TP rank 0 only)."""
        total = torch.zeros((), dtype=torch.float64)
        for it in self.items:
            g = it.param.grad
            if g is None or it.group.rank != it.owner:  # one replica counts (the owner)
                continue
            if it.placement.tp_replicated and self.mesh.coords.tp != 0:
                continue
            if it.name in self.counted_elsewhere:
                continue
            total += g.double().pow(2).sum().cpu()
        return all_reduce_(total, self.mesh.world).sqrt()

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale owned gradients so the global norm is at most ``max_norm``; returns the norm
        before clipping (non-finite norms are returned unchanged and nothing is scaled)."""
        norm = float(self.grad_norm())
        scale = max_norm / (norm + 1e-6) if max_norm > 0 and math.isfinite(norm) else 1.0
        if scale < 1.0:  # the same rule as torch.nn.utils.clip_grad_norm_
            for it in self.items:
                if it.param.grad is not None:
                    it.param.grad.mul_(scale)
        return norm

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """After the owners' optimizer step: every rank gets the updated weights."""
        if not self.zero:
            return
        for members in self._groups():
            group, owner = members[0].group, members[0].owner
            if not group.active:
                continue
            for bucket in _buckets(members):
                params = [it.param.data for it in bucket]
                flat = _flatten_dense_tensors(params)
                broadcast_(flat, owner, group)
                if group.rank != owner:
                    for p, new in zip(params, _unflatten_dense_tensors(flat, params)):
                        p.copy_(new)
