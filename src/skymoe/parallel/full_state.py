"""Layout-independent checkpoints of a sharded model and its (ZeRO-1) optimizer.

A checkpoint is always what one process would have written: the whole model in HF format and
``optimizer.state_dict()`` of an AdamW over the whole model's parameters. Saving gathers every
parameter and optimizer tensor onto rank 0, one tensor at a time, from the ranks that hold its
pieces (``placement`` says where each piece goes; with ZeRO-1 only the owner's optimizer state
counts). Loading reads the full state and keeps this rank's pieces. So a run saved under one
layout resumes under any other, including a single process.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import SkyworkMoeConfig
from ..model.transformer import SkyworkForCausalLM
from .comm import all_reduce_
from .data_parallel import DataParallel
from .mesh import ParallelMesh
from .placement import placement


def gather_tensor(local: torch.Tensor, name: str, full_shape: tuple[int, ...],
                  config: SkyworkMoeConfig, mesh: ParallelMesh, valid: bool = True
                  ) -> torch.Tensor | None:
    """The full fp32 tensor ``name`` on rank 0 (None on other ranks), assembled from each
    rank's ``local`` piece; pieces with ``valid`` False are ignored (a collective: every rank
    calls it for the same names in the same order)."""
    world = mesh.world
    if not world.active:
        return local.detach().float().clone()
    layout = mesh.layout
    parts = [placement(name, config, layout, layout.coords(r)) for r in range(world.size)]
    shapes = [p.local_shape(full_shape) for p in parts]
    width = 1 + max(math.prod(s) for s in shapes)
    buf = torch.zeros(width, dtype=torch.float32)
    buf[0] = float(valid)
    buf[1:1 + local.numel()] = local.detach().reshape(-1).float().cpu()
    received = [torch.empty_like(buf) for _ in range(world.size)] if mesh.is_main else None
    world.traffic.record("send", buf.numel() * 4, world.size)
    dist.gather(buf, received, dst=0, group=world.pg)
    if not mesh.is_main:
        return None
    full = torch.zeros(full_shape, dtype=torch.float32)
    for part, shape, piece in zip(parts, shapes, received):
        if piece[0] > 0:
            part.put(full, piece[1:1 + math.prod(shape)].view(shape))
    return full


def full_shapes(config: SkyworkMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the whole model (in model order) and its unsharded shape."""
    with torch.device("meta"):
        template = SkyworkForCausalLM(config)
    return {n: tuple(p.shape) for n, p in template.named_parameters()}


def _local_or_absent(params: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, bool]:
    """This rank's piece of ``name``, or an empty placeholder when another pipeline stage
    holds it."""
    return (params[name], True) if name in params else (torch.zeros(0), False)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (a tied one once) and buffers (the MoE routing biases) by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def gather_model(model: nn.Module, mesh: ParallelMesh) -> SkyworkForCausalLM | None:
    """The whole fp32 model on rank 0 (None elsewhere) from every rank's shard (a sharded
    ``SkyworkForCausalLM`` or pipeline stage)."""
    if not mesh.world.active:
        return model
    config = model.config
    with torch.device("meta"):
        template = SkyworkForCausalLM(config)
    shapes = {n: tuple(t.shape) for n, t in _tensors(template).items()}
    full = None
    if mesh.is_main:
        full = template.to_empty(device="cpu")
        full.tie_weights()
        targets = _tensors(full)
    held_tensors = _tensors(model)
    for name, shape in shapes.items():
        local, held = _local_or_absent(held_tensors, name)
        t = gather_tensor(local, name, shape, config, mesh, valid=held)
        if full is not None:
            targets[name].copy_(t)
    return full


@torch.no_grad()
def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                           dp: DataParallel, mesh: ParallelMesh, full_groups: list[list[str]]
                           ) -> dict[str, Any] | None:
    """On rank 0, the ``state_dict()`` an AdamW over the whole model would have; None
    elsewhere. ``full_groups``: the whole model's parameter names per optimizer group (this
    rank's optimizer has the same groups, holding its own parameters)."""
    if not mesh.world.active:
        return optimizer.state_dict()
    shapes = full_shapes(model.config)
    owned = {it.name: dp.owns(it) for it in dp.items}
    params = dict(model.named_parameters())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(n for names in full_groups for n in names):
        p, held = _local_or_absent(params, name)
        s = optimizer.state.get(p, {}) if held else {}
        valid = held and owned[name] and "exp_avg" in s
        entry: dict[str, torch.Tensor] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            local = s[key] if valid else torch.zeros_like(p)
            full = gather_tensor(local, name, shapes[name], model.config, mesh, valid)
            if full is not None:
                entry[key] = full
        step = torch.tensor([float(s["step"]) if valid else -1.0])
        all_reduce_(step, mesh.world, dist.ReduceOp.MAX)  # the owner's step count
        if mesh.is_main and step.item() >= 0:
            state[index] = {"step": torch.tensor(step.item()), **entry}
    if not mesh.is_main:
        return None
    groups, start = [], 0
    for group, names in zip(optimizer.param_groups, full_groups):
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": state, "param_groups": groups}


@torch.no_grad()
def restore_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                            model: nn.Module, dp: DataParallel, mesh: ParallelMesh,
                            full_groups: list[list[str]]) -> None:
    """Load a whole-model ``saved`` state dict (groups as in ``full_groups``) into this rank's
    (sharded, ZeRO-1, pipeline-stage) optimizer: each owned parameter gets its piece of the
    saved moments."""
    if not mesh.world.active:
        optimizer.load_state_dict(saved)
        return
    owned = {it.name: dp.owns(it) for it in dp.items}
    params = dict(model.named_parameters())
    places = {it.name: it.placement for it in dp.items}
    names_in_order = [n for names in full_groups for n in names]
    saved_count = sum(len(g["params"]) for g in saved["param_groups"])
    if saved_count != len(names_in_order):
        raise ValueError(f"the saved optimizer has {saved_count} parameters, this model "
                         f"{len(names_in_order)}")
    index_of = {n: i for i, n in enumerate(names_in_order)}
    if model.config.tie_word_embeddings:  # a pipeline's last stage holds the tied copy
        index_of["lm_head.weight"] = index_of["model.embed_tokens.weight"]
    for name, p in params.items():
        entry = saved["state"].get(index_of[name])
        if entry is None or not owned[name]:
            continue
        optimizer.state[p] = {
            "step": entry["step"].clone().float().to(p.device),
            "exp_avg": places[name].take(entry["exp_avg"]).to(p),
            "exp_avg_sq": places[name].take(entry["exp_avg_sq"]).to(p)}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
