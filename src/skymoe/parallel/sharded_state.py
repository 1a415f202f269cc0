"""Sharded checkpoints of a sharded model and its (ZeRO-1) optimizer: every rank writes and
reads only what it holds.

The checkpoint's tensors are the whole model's, under their Hugging Face names except the
experts, which stay stacked (``...experts.w13`` as ``[E, 2, F, H]``, w1 then w3 of each expert;
``...experts.w2`` as ``[E, H, F]``; their LoRA factors under the model's names, ``w13_B`` as
``[E, 2, F, r]``), so any layout, or one process, reads its own cut of them,
and ``skymoe export`` writes an HF directory from them tensor by tensor. A rank's part of each
tensor (``placement``) becomes one contiguous ``Piece``: tensor-parallel head and vocabulary
ranges, an expert-parallel rank's experts and an expert-tensor-parallel rank's slice of them,
each a view of the rank's whole local tensor, so saving copies nothing. The AdamW moments are stored as ``optimizer.exp_avg.<name>`` and
``optimizer.exp_avg_sq.<name>`` pieces, written by the rank that owns them under ZeRO-1; copies
held by several ranks (replicated norms and routers, data-parallel replicas without ZeRO, the
pipeline's tied LM head) are written once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.dcp import Piece
from ..config import SkyworkMoeConfig
from ..model.lora import FACTORS, factor_of, factor_shape
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


def _piece_of(name: str, local: torch.Tensor, full: tuple[int, ...], place: Placement,
              tied: bool) -> tuple[str, Piece] | None:
    """The checkpoint key and piece of one (sharded) parameter, buffer or moment ``local``
    (None when this rank holds none of it: only vocabulary padding)."""
    if tied and name == "lm_head.weight":  # a pipeline's copy of the tied embedding
        name = "model.embed_tokens.weight"
    if name.endswith((".experts.w13", ".experts.lora.w13_B")):
        # Stacked [E, 2 * F, H] with a rank's [w1 rows; w3 rows] side by side: stored as
        # [E, 2, F, H], so a rank's experts and FFN slice are one compact block (a view of
        # the whole local tensor, which DCP writes without copying). The experts' LoRA
        # ``w13_B`` [E, 2 * F, r] is cut like ``w13`` and stored as [E, 2, F, r].
        experts, ffn = full[0], full[1] // 2
        rows = local.shape[1] // 2
        e0, _ = _span(place.index.get(0), experts)
        f0, _ = _span(place.index.get(1, torch.arange(ffn))[:rows], ffn)
        return name, Piece(local.view(local.shape[0], 2, rows, full[2]),
                           (experts, 2, ffn, full[2]), (e0, 0, f0, 0))
    view, offsets = local, []
    for dim, size in enumerate(full):
        start, length = _span(place.index.get(dim), size)
        view = view.narrow(dim, 0, length)
        offsets.append(start)
    return (name, Piece(view, full, tuple(offsets))) if view.numel() else None


def _named_pieces(model: nn.Module, placements: dict[str, Placement] | None,
                  tensors: list[tuple[str, str, torch.Tensor]]) -> dict[str, Piece]:
    """Pieces ``key_prefix + HF name`` of each (key_prefix, model name, local tensor): the
    tensor cut as that name's placement says (whole without ``placements``)."""
    full = _full_shapes(model.config)
    out: dict[str, Piece] = {}
    for key_prefix, name, t in tensors:
        place = placements[name] if placements is not None else _WHOLE
        shape = full.get(name) or _extra_shape(name, t, full)
        found = _piece_of(name, t.detach(), shape, place, model.config.tie_word_embeddings)
        if found is not None:
            out[key_prefix + found[0]] = found[1]
    return out


def _extra_shape(name: str, local: torch.Tensor, full: dict[str, tuple[int, ...]]
                 ) -> tuple[int, ...]:
    """The whole shape of a tensor the model template lacks: a pipeline's tied LM head (the
    embedding's) or a LoRA factor (from its base weight's)."""
    if name == "lm_head.weight":
        return full["model.embed_tokens.weight"]
    adapter = factor_of(name)
    if adapter is None:
        raise KeyError(f"{name}: not a tensor of the model")
    weight, factor = adapter
    return factor_shape(factor, full[weight], local.shape[FACTORS[factor][1]])


def model_pieces(model: nn.Module, placements: dict[str, Placement] | None = None,
                 names: set[str] | None = None) -> dict[str, Piece]:
    """This rank's pieces of every parameter and buffer of ``model`` (a whole model, or a
    sharded model or pipeline part with ``placements``, the parameter placements it was cut
    with), or of those in ``names``, under HF names."""
    return _named_pieces(model, placements, [
        ("", name, t) for name, t in [*model.named_parameters(), *model.named_buffers()]
        if names is None or name in names])


def optimizer_pieces(optimizer: torch.optim.Optimizer, model: nn.Module, dp: DataParallel,
                     placements: dict[str, Placement] | None = None) -> dict[str, Piece]:
    """The AdamW moments this rank owns (all of its parameters' without ZeRO-1), as pieces
    ``optimizer.<moment>.<HF name>``."""
    owned = {it.name for it in dp.items if dp.owns(it)}
    states = [(name, optimizer.state.get(p, {})) for name, p in model.named_parameters()]
    return _named_pieces(model, placements, [
        (f"optimizer.{moment}.", name, state[moment]) for name, state in states
        if name in owned and MOMENTS[0] in state for moment in MOMENTS])


def hf_blocks(key: str, shape: tuple[int, ...]
              ) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The HF tensors of checkpoint tensor ``key`` of ``shape``, each as (HF name, HF shape,
    offsets and sizes of its block in the checkpoint tensor): a stacked expert tensor gives
    every expert's w1, w3 (from ``w13``) or w2, any other tensor itself."""
    prefix, _, which = key.rpartition(".")
    if which == "w13" and prefix.endswith(".experts"):
        _, _, ffn, hidden = shape
        return [(f"{prefix}.{e}.{w}.weight", (ffn, hidden), (e, half, 0, 0), (1, 1, ffn, hidden))
                for e in range(shape[0]) for half, w in enumerate(("w1", "w3"))]
    if which == "w2" and prefix.endswith(".experts"):
        return [(f"{prefix}.{e}.w2.weight", shape[1:], (e, 0, 0), (1, *shape[1:]))
                for e in range(shape[0])]
    return [(key, shape, (0,) * len(shape), shape)]


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


__all__ = ["empty_optimizer_state", "hf_blocks", "model_pieces", "optimizer_pieces", "optimizer_step"]
