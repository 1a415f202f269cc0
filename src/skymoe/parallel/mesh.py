"""Process groups for a ``ParallelLayout``: the dense mesh [PP, DP, TP] and the expert mesh
[PP, EDP, EP, ETP], built with ``DeviceMesh`` over the same ranks and handed to modules as
values (``CommGroup``), never as globals."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..errors import ConfigError
from .comm import CollectiveOrder, CommGroup, Traffic, single
from .layout import Coords, ParallelLayout

DENSE_DIMS = ("pp", "dp", "tp")
EXPERT_DIMS = ("pp", "edp", "ep", "etp")


@dataclass
class ParallelMesh:
    """This rank's groups along every dimension of both meshes, one traffic counter and one
    collective order (shared by all the groups)."""

    layout: ParallelLayout
    rank: int
    coords: Coords
    groups: dict[str, CommGroup]
    traffic: Traffic = field(default_factory=Traffic)
    order: CollectiveOrder = field(default_factory=CollectiveOrder)

    def __getattr__(self, name: str) -> CommGroup:
        groups = self.__dict__.get("groups", {})
        if name in groups:
            return groups[name]
        raise AttributeError(name)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_mesh(layout: ParallelLayout | None = None) -> ParallelMesh:
    """The mesh of a single process: every group has one rank."""
    layout = layout or ParallelLayout()
    if layout.world_size != 1:
        raise ConfigError(f"layout {layout.name} needs {layout.world_size} processes; launch "
                          "with torchrun --nproc-per-node")
    traffic, order = Traffic(), CollectiveOrder()
    names = {*DENSE_DIMS, *EXPERT_DIMS, "world"}
    return ParallelMesh(layout, 0, layout.coords(0),
                        {n: single(traffic, n, order) for n in names}, traffic, order)


def build_mesh(layout: ParallelLayout, device_type: str = "cpu") -> ParallelMesh:
    """Groups for ``layout`` over the initialized default process group (or a local mesh when
    running as one process)."""
    if not dist.is_initialized():
        return local_mesh(layout)
    world, rank = dist.get_world_size(), dist.get_rank()
    layout.validate(world_size=world)
    ranks = torch.arange(world)
    dense = DeviceMesh(device_type, ranks.view(layout.pp, layout.dp, layout.tp),
                       mesh_dim_names=DENSE_DIMS)
    expert = DeviceMesh(device_type,
                        ranks.view(layout.pp, layout.edp, layout.ep, layout.etp),
                        mesh_dim_names=EXPERT_DIMS)
    traffic, order = Traffic(), CollectiveOrder()
    groups: dict[str, CommGroup] = {}
    for mesh, dims in ((dense, DENSE_DIMS), (expert, EXPERT_DIMS)):
        for index, dim in enumerate(dims):
            if dim in groups:
                continue
            size = mesh.size(index)
            groups[dim] = (CommGroup(mesh.get_group(dim), size, mesh.get_local_rank(dim),
                                     traffic, dim, order) if size > 1
                           else single(traffic, dim, order))
    groups["world"] = CommGroup(dist.group.WORLD, world, rank, traffic, "world", order)
    return ParallelMesh(layout, rank, layout.coords(rank), groups, traffic, order)


def init_distributed(timeout_s: float = 600.0, device_type: str = "cpu") -> tuple[int, int]:
    """Join the job torchrun started (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the
    environment): gloo on CPU, NCCL on CUDA, collectives failing after ``timeout_s``.
    Returns (rank, world size); (0, 1) without torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
