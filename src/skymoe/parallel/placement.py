"""Which part of each full (single-process) parameter a rank holds under a layout.

One pure function, used to shard a model (``parallelize``), to gather a checkpoint from the
shards and to cut a checkpoint (weights or optimizer state) for another layout. A placement
lists, per dimension, the indices of the full tensor this rank keeps:

- attention: q/o at this rank's query heads, k/v at its KV heads (KV heads split with the first
  ``kv_heads % tp`` ranks taking one extra; each rank gets the query heads of its KV groups);
- dense MLP: gate/up rows and down columns of this rank's part of the intermediate size;
- embedding and LM head: this rank's vocabulary rows; with a vocabulary multiple (inference,
  Skywork's 24) the vocabulary is first padded to that multiple so that the ranks get equal
  row counts, and the padding rows (past the real vocabulary) are zeros;
- experts: this rank's experts (``EP``) and, with ``ETP``, its part of each expert's
  intermediate size (in ``w13`` both the w1 and the w3 rows of that part);
- norms and routers: everything (replicated);
- LoRA adapters (``...lora.*``): like their base weight. ``A`` [r, in] takes the weight's
  input slice and ``B`` [out, r] its output slice (an expert's factors also follow its expert
  and ETP slices); the factor a split leaves whole (``A`` of a column-parallel weight, ``B`` of
  a row-parallel one) is replicated over TP (ETP), and each rank's gradient of it is only its
  share of the whole: ``partial_grad``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import SkyworkMoeConfig
from ..model.lora import factor_of
from .layout import Coords, ParallelLayout, split_range


@dataclass(frozen=True)
class Placement:
    """``index[dim]``: the full tensor's indices along ``dim`` that this rank holds (dims not
    listed are whole). ``tp_replicated``: every TP rank holds the same values (counted once in
    norms). ``expert``: replicated over the expert-data-parallel group instead of DP.
    ``partial_grad``: replicated over TP (ETP for an expert tensor), but each rank's gradient
    is a partial sum, to be summed over that group (a LoRA factor beside a split weight)."""

    index: dict[int, torch.Tensor]
    tp_replicated: bool
    expert: bool = False
    partial_grad: bool = False

    @property
    def is_whole(self) -> bool:
        return not self.index

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full``. Dimensions ``full`` lacks or holds once (broadcast,
        like a per-tensor FP8 scale where a per-channel one could be) are taken whole; indices
        past the end of a dimension (vocabulary padding) give zeros."""
        out = full
        for dim, idx in sorted(self.index.items()):
            if dim < out.ndim and out.shape[dim] > 1:
                real = idx[idx < out.shape[dim]]
                part = out.index_select(dim, real.to(out.device))
                if len(real) < len(idx):
                    pad = list(part.shape)
                    pad[dim] = len(idx) - len(real)
                    part = torch.cat([part, part.new_zeros(pad)], dim=dim)
                out = part
        return out

    def local_shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(len(self.index[d]) if d in self.index else n
                     for d, n in enumerate(full_shape))

    def put(self, full: torch.Tensor, part: torch.Tensor) -> None:
        """Write this rank's ``part`` into its place in ``full`` (padding rows dropped)."""
        if not self.index:
            full.copy_(part)
            return
        for d, idx in self.index.items():  # padding sits at the end of its dimension
            part = part.narrow(d, 0, int((idx < full.shape[d]).sum()))
        grids = torch.meshgrid(*[self.index[d][self.index[d] < n].to(full.device)
                                 if d in self.index else torch.arange(n, device=full.device)
                                 for d, n in enumerate(full.shape)], indexing="ij")
        full[grids] = part


def _arange(start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end, dtype=torch.long)


# Skywork-MoE's deployment pads the vocabulary to a multiple of 24 (divisible by 1, 2, 3, 4, 6,
# 8 and 12), so tensor-parallel ranks hold equal embedding and LM-head shards.
VOCAB_MULTIPLE = 24


def padded_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (65532 -> 65544 for 24)."""
    return -(-vocab_size // multiple) * multiple


def vocab_rows(vocab_size: int, tp: int, rank: int, multiple: int = 1) -> tuple[int, int]:
    """[start, end) of the (padded) vocabulary rows that TP rank ``rank`` holds."""
    return split_range(padded_vocab(vocab_size, multiple), tp, rank)


def attention_heads(config: SkyworkMoeConfig, tp: int, rank: int) -> tuple[range, range]:
    """(query heads, KV heads) of TP rank ``rank``: KV heads split unevenly, each rank taking
    the whole query group of each of its KV heads."""
    kv0, kv1 = split_range(config.num_key_value_heads, tp, rank)
    group = config.num_attention_heads // config.num_key_value_heads
    return range(kv0 * group, kv1 * group), range(kv0, kv1)


def _head_rows(heads: range, head_dim: int) -> torch.Tensor:
    return _arange(heads.start * head_dim, heads.stop * head_dim)


_LAYER = r"^model\.layers\.\d+\."


def placement(name: str, config: SkyworkMoeConfig, layout: ParallelLayout,
              coords: Coords, vocab_multiple: int = 1) -> Placement:
    """Where parameter ``name`` (the model's own names) lives on the rank at ``coords``; the
    vocabulary is padded to a multiple of ``vocab_multiple`` before it is split."""
    c, tp, t = config, layout.tp, coords.tp
    adapter = factor_of(name)
    if adapter is not None:
        return _factor_placement(adapter[1], placement(adapter[0], config, layout, coords),
                                 layout)
    if re.search(r"(^|\.)(input_layernorm|post_attention_layernorm|norm)\.weight$", name) \
            or re.search(r"block_sparse_moe\.(gate(\.\d+)?\.weight|expert_bias)$", name):
        return Placement({}, tp_replicated=True)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return Placement({0: _arange(*vocab_rows(c.vocab_size, tp, t, vocab_multiple))},
                         tp_replicated=False)
    m = re.search(_LAYER + r"self_attn\.([qkvo])_proj\.weight$", name)
    if m:
        q_heads, kv_heads = attention_heads(c, tp, t)
        which = m[1]
        if which == "q":
            return Placement({0: _head_rows(q_heads, c.head_size)}, False)
        if which == "o":
            return Placement({1: _head_rows(q_heads, c.head_size)}, False)
        return Placement({0: _head_rows(kv_heads, c.head_size)}, False)
    m = re.search(_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight$", name)
    if m:
        ffn = _arange(*split_range(c.intermediate_size, tp, t))
        return Placement({1 if m[1] == "down_proj" else 0: ffn}, False)
    m = re.search(_LAYER + r"(self_attn|mlp)\.(\w+)\.weight_scale$", name)
    if m:  # FP8 scale: per output channel, cut like a column-parallel weight's rows (``take``
        # leaves a per-tensor scale whole); a row-parallel weight's output rows are whole
        if m[2] not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            return Placement({}, tp_replicated=True)
        rows = placement(name[: -len("_scale")], config, layout, coords).index
        return Placement({0: rows[0]} if 0 in rows else {}, tp_replicated=False)
    m = re.search(_LAYER + r"block_sparse_moe\.experts\.(w13|w2)(_scale)?$", name)
    if m:
        index = {}
        if layout.ep > 1:
            per_rank = c.num_experts // layout.ep
            index[0] = _arange(coords.ep * per_rank, (coords.ep + 1) * per_rank)
        if layout.etp > 1 and not m[2]:  # a scale per expert follows the expert, not its slice
            f = _arange(*split_range(c.intermediate_size, layout.etp, coords.etp))
            index[1 if m[1] == "w13" else 2] = (torch.cat((f, f + c.intermediate_size))
                                                if m[1] == "w13" else f)
        return Placement(index, tp_replicated=False, expert=True)
    raise KeyError(f"no parallel placement is defined for parameter '{name}'")


def _factor_placement(factor: str, weight: Placement, layout: ParallelLayout) -> Placement:
    """A LoRA factor's placement from its base weight's: the experts' dimension as the weight,
    ``A`` the weight's input slice (last dimension), ``B`` its output slice (second to last).
    A factor whole beside a weight split over several TP (ETP) ranks has a partial gradient."""
    stacked = weight.expert  # [E, out, in] experts, else [out, in]
    follows = (2 if stacked else 1) if factor.endswith("A") else (1 if stacked else 0)
    index = {d: i for d, i in weight.index.items() if d == follows or (stacked and d == 0)}
    group = layout.etp if stacked else layout.tp
    partial = group > 1 and any(d not in index for d in weight.index)
    return Placement(index, tp_replicated=partial, expert=stacked, partial_grad=partial)
