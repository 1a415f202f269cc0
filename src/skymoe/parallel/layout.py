"""Parallel layouts: sizes for PP, DP, TP (dense mesh) and EP, ETP (expert mesh), validated up front.

Ranks are laid out as the dense mesh ``[PP, DP, TP]`` (TP fastest). The expert mesh reshapes
the same ranks of each pipeline stage as ``[EDP, EP, ETP]`` (ETP fastest), where EDP, the
expert-data-parallel size, is what remains: ``DP * TP / (EP * ETP)``. The three expert
layouts of the Skywork-MoE report (docs/distributed.md) are points of this one scheme:

- **EP** (Megatron-style): ``ETP = 1`` and ``EP`` up to ``DP * TP``: experts spread over data
  and tensor ranks;
- **ETP**: ``EP = DP`` and ``ETP = TP``: each expert is tensor-split over the TP group and
  tokens travel between data-parallel ranks;
- **EDP**: ``EP = TP`` and ``ETP = 1``: the expert-parallel group *is* the tensor-parallel
  group, whole experts per rank, expert weights replicated over DP like dense ones.

Everything here is pure (no process groups); ``skymoe.parallel.mesh`` builds the groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..config import SkyworkMoeConfig
from ..errors import ConfigError


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` ranks, the first ``total % parts`` ranks one extra
    (36 heads over 8 ranks -> 5,5,5,5,4,4,4,4)."""
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of part ``index`` under ``split_sizes``."""
    sizes = split_sizes(total, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


class Coords(NamedTuple):
    """A rank's position in both meshes."""

    pp: int
    dp: int
    tp: int
    edp: int
    ep: int
    etp: int


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension (1 = not parallel along it)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: how many ranks of a stage hold the same experts."""
        return self.dp * self.tp // (self.ep * self.etp)

    @property
    def slices_tokens(self) -> bool:
        """Whether the TP ranks of a group split the (replicated) tokens among themselves before
        expert dispatch: with ETP = 1 each TP rank routes its own 1/TP of the tokens; with
        ETP = TP every rank of the group works on all of them (each on its expert slice)."""
        return self.tp > 1 and self.etp == 1

    @property
    def name(self) -> str:
        """Short description, e.g. ``dp2-tp2 EDP(ep2)``."""
        dense = "-".join(f"{k}{v}" for k, v in (("pp", self.pp), ("dp", self.dp), ("tp", self.tp))
                         if v > 1) or "single"
        if self.ep == 1 and self.etp == 1:
            return dense
        if self.etp > 1:
            kind = "ETP"
        elif self.tp > 1 and self.ep == self.tp:
            kind = "EDP"
        else:
            kind = "EP"
        return f"{dense} {kind}(ep{self.ep}" + (f",etp{self.etp})" if self.etp > 1 else ")")

    def validate(self, world_size: int | None = None,
                 config: SkyworkMoeConfig | None = None) -> "ParallelLayout":
        """Raise ``ConfigError`` naming the setting when the layout cannot work (for
        ``world_size`` processes and the model ``config``, when given)."""
        for key in ("dp", "tp", "pp", "ep", "etp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(f"the layout needs pp*dp*tp = {self.pp}*{self.dp}*{self.tp} = "
                              f"{self.world_size} processes but {world_size} were started; "
                              "change parallel.dp/tp/pp or the torchrun --nproc-per-node")
        if self.etp not in (1, self.tp):
            raise ConfigError(f"parallel.etp must be 1 or equal to parallel.tp ({self.tp}), "
                              f"got {self.etp}: experts are tensor-split over the TP group")
        stage = self.dp * self.tp
        if stage % (self.ep * self.etp):
            raise ConfigError(f"parallel.ep * parallel.etp = {self.ep * self.etp} must divide "
                              f"the {stage} ranks of a pipeline stage (dp * tp)")
        if config is not None:
            self._validate_for(config)
        return self

    def _validate_for(self, c: SkyworkMoeConfig) -> None:
        if self.pp > c.num_hidden_layers:
            raise ConfigError(f"parallel.pp = {self.pp} exceeds the model's "
                              f"{c.num_hidden_layers} layers")
        if self.tp > c.num_key_value_heads:
            raise ConfigError(f"parallel.tp = {self.tp} exceeds num_key_value_heads = "
                              f"{c.num_key_value_heads}: attention is split at KV-head groups")
        if self.tp > c.vocab_size:
            raise ConfigError(f"parallel.tp = {self.tp} exceeds vocab_size = {c.vocab_size}")
        has_moe = any(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        if not has_moe and (self.ep > 1 or self.etp > 1):
            raise ConfigError("parallel.ep/etp > 1 needs a model with MoE layers")
        if has_moe and c.num_experts % self.ep:
            raise ConfigError(f"parallel.ep = {self.ep} must divide num_experts = "
                              f"{c.num_experts}")
        if self.tp > c.intermediate_size:
            raise ConfigError(f"parallel.tp = {self.tp} exceeds intermediate_size = "
                              f"{c.intermediate_size}")

    def coords(self, rank: int) -> Coords:
        """Where global ``rank`` sits in the dense and expert meshes."""
        stage_ranks = self.dp * self.tp
        pp, local = divmod(rank, stage_ranks)
        dp, tp = divmod(local, self.tp)
        edp, rest = divmod(local, self.ep * self.etp)
        ep, etp = divmod(rest, self.etp)
        return Coords(pp, dp, tp, edp, ep, etp)


def parse_layout(spec: dict[str, int]) -> ParallelLayout:
    """A layout from ``{"dp": .., "tp": .., ...}`` with named-preset support:
    ``expert = "edp"`` sets ep = tp, ``"etp"`` sets ep = dp and etp = tp, ``"ep"`` keeps ep."""
    values = dict(spec)
    preset = values.pop("expert", "")
    unknown = set(values) - {"dp", "tp", "pp", "ep", "etp"}
    if unknown:
        raise ConfigError(f"unknown parallel setting(s) {sorted(unknown)}; use dp, tp, pp, ep, "
                          "etp, expert")
    layout = ParallelLayout(**{k: int(v) for k, v in values.items()})
    if preset in ("", "ep"):
        return layout
    if preset == "edp":
        return ParallelLayout(layout.dp, layout.tp, layout.pp, ep=layout.tp, etp=1)
    if preset == "etp":
        return ParallelLayout(layout.dp, layout.tp, layout.pp, ep=layout.dp, etp=layout.tp)
    raise ConfigError(f"parallel.expert must be 'ep', 'etp' or 'edp', not {preset!r}")
