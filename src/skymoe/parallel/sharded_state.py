"""Sharded checkpoints of a sharded model and its (ZeRO-1) optimizer: every rank writes and
reads only what it holds.

The checkpoint's tensors are the whole model's, under their Hugging Face names (experts one by
one: ``...experts.{e}.w1.weight``), so any layout, or one process, reads its own cut of them,
and ``skymoe export`` writes an HF directory from them tensor by tensor. A rank's part of each
tensor (``placement``) becomes one contiguous ``Piece``: tensor-parallel head and vocabulary
ranges, an expert-parallel rank's experts, an expert-tensor-parallel rank's slice of each
expert's w1, w3 and w2. The AdamW moments are stored as ``optimizer.exp_avg.<name>`` and
``optimizer.exp_avg_sq.<name>`` pieces, written by the rank that owns them under ZeRO-1; copies
held by several ranks (replicated norms and routers, data-parallel replicas without ZeRO, the
pipeline's tied LM head) are written once.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..checkpoint.dcp import Piece
from ..config import SkyworkMoeConfig
from ..model.transformer import SkyworkForCausalLM
from .data_parallel import DataParallel
from .placement import Placement

MOMENTS = ("exp_avg", "exp_avg_sq")
_WHOLE = Placement({}, tp_replicated=True)


def _full_shapes(config: SkyworkMoeConfig) -> dict[str, tuple[int, ...]]:
    """Unsharded shapes of every parameter and buffer name of the whole model."""
    with torch.device("meta"):
        template = SkyworkForCausalLM(config)
    return {n: tuple(t.shape) for n, t in [*template.named_parameters(),
                                           *template.named_buffers()]}


def _span(index: torch.Tensor | None, size: int) -> tuple[int, int]:
    """(start, length) of a placement's indices along a dimension of ``size`` (indices past
    the end are vocabulary padding and not part of the whole tensor)."""
    if index is None:
        return 0, size
    real = index[index < size]
    if len(real) and not torch.equal(real, torch.arange(int(real[0]), int(real[0]) + len(real))):
        raise ValueError("a placement that is not one contiguous range per dimension")
    return (int(real[0]) if len(real) else 0), len(real)


def _pieces_of(name: str, local: torch.Tensor, full: tuple[int, ...], place: Placement,
               tied: bool) -> Iterator[tuple[str, Piece]]:
    """The HF-named pieces of one (sharded) parameter, buffer or moment ``local``."""
    if tied and name == "lm_head.weight":  # a pipeline's copy of the tied embedding
        name = "model.embed_tokens.weight"
    if name.endswith((".experts.w13", ".experts.w2")):
        prefix, which = name.rsplit(".", 1)
        experts = place.index.get(0, torch.arange(full[0]))
        if which == "w13":
            ffn = full[1] // 2
            start, length = _span(place.index.get(1, torch.arange(ffn))[: local.shape[1] // 2],
                                  ffn)
            for i, e in enumerate(experts.tolist()):
                for w, rows in (("w1", local[i, :length]), ("w3", local[i, length:])):
                    yield f"{prefix}.{e}.{w}.weight", Piece(rows, (ffn, full[2]), (start, 0))
        else:
            start, _ = _span(place.index.get(2), full[2])
            for i, e in enumerate(experts.tolist()):
                yield f"{prefix}.{e}.w2.weight", Piece(local[i], full[1:], (0, start))
        return
    view, offsets = local, []
    for dim, size in enumerate(full):
        start, length = _span(place.index.get(dim), size)
        view = view.narrow(dim, 0, length)
        offsets.append(start)
    if view.numel():
        yield name, Piece(view, full, tuple(offsets))


def _named_pieces(model: nn.Module, placements: dict[str, Placement] | None,
                  tensors: list[tuple[str, str, torch.Tensor]]) -> dict[str, Piece]:
    """Pieces ``key_prefix + HF name`` of each (key_prefix, model name, local tensor): the
    tensor cut as that name's placement says (whole without ``placements``)."""
    full = _full_shapes(model.config)
    out: dict[str, Piece] = {}
    for key_prefix, name, t in tensors:
        place = placements[name] if placements is not None else _WHOLE
        shape = full.get(name, full.get("model.embed_tokens.weight"))  # a tied head's copy
        for key, piece in _pieces_of(name, t.detach(), shape, place,
                                     model.config.tie_word_embeddings):
            out[key_prefix + key] = piece
    return out


def model_pieces(model: nn.Module, placements: dict[str, Placement] | None = None
                 ) -> dict[str, Piece]:
    """This rank's pieces of every parameter and buffer of ``model`` (a whole model, or a
    sharded model or pipeline part with ``placements``, the parameter placements it was cut
    with), under HF names."""
    return _named_pieces(model, placements, [
        ("", name, t) for name, t in [*model.named_parameters(), *model.named_buffers()]])


def optimizer_pieces(optimizer: torch.optim.Optimizer, model: nn.Module, dp: DataParallel,
                     placements: dict[str, Placement] | None = None) -> dict[str, Piece]:
    """The AdamW moments this rank owns (all of its parameters' without ZeRO-1), as pieces
    ``optimizer.<moment>.<HF name>``."""
    owned = {it.name for it in dp.items if dp.owns(it)}
    states = [(name, optimizer.state.get(p, {})) for name, p in model.named_parameters()]
    return _named_pieces(model, placements, [
        (f"optimizer.{moment}.", name, state[moment]) for name, state in states
        if name in owned and MOMENTS[0] in state for moment in MOMENTS])


def optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    """The step count of this rank's AdamW states (every state steps together), 0 if none."""
    steps = {int(s["step"]) for s in optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"AdamW states at different steps {sorted(steps)}")
    return steps.pop() if steps else 0


@torch.no_grad()
def empty_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, dp: DataParallel,
                          step: int) -> None:
    """Give every parameter this rank owns a zero AdamW state at ``step`` (for
    ``optimizer_pieces`` to be filled from a checkpoint)."""
    owned = {it.name for it in dp.items if dp.owns(it)}
    for name, p in model.named_parameters():
        if name in owned:
            optimizer.state[p] = {"step": torch.tensor(float(step), device=p.device),
                                  **{m: torch.zeros_like(p) for m in MOMENTS}}


__all__ = ["empty_optimizer_state", "model_pieces", "optimizer_pieces", "optimizer_step"]
