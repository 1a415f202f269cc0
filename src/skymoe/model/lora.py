"""Low-rank adapters (LoRA) on an existing model: the attention and dense-MLP projections and
the experts, with the base weights frozen.

A projection ``W`` [out, in] gains ``scale * B @ A`` (``A`` [r, in], ``B`` [out, r], ``scale =
alpha / r``): its output becomes ``x W^T + scale * dropout(x) A^T B^T``. ``B`` starts at zero,
so a fresh adapter leaves the model's function unchanged.

- Linear projections (``nn.Linear`` or an FP8 linear: any module computing ``x W^T``) keep
  their own module and parameter names; the adapter is a child ``lora`` (``LinearLoRA``) whose
  delta a forward hook adds to the module's output.
- Experts (``SwiGLUExperts`` or FP8 experts) get a child ``lora`` (``ExpertLoRA``) with one
  adapter per expert on the stacked ``w13`` [E, 2F, H] and ``w2`` [E, H, F]: ``w13_A`` [E, r, H],
  ``w13_B`` [E, 2F, r], ``w2_A`` [E, r, F], ``w2_B`` [E, H, r]. The experts' grouped path
  computes the low-rank products on the rows sorted by expert, grouped like the base matmuls;
  merged weights are never formed in training.

``add_lora`` freezes every base parameter (the router stays trainable when asked), so gradients
and optimizer state exist for the adapters only; ``merge_lora`` folds them into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .moe import MoEBlock, grouped_linear

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # dense layers' MLP
EXPERTS_TARGET = "experts"
TARGETS = (*ATTENTION_TARGETS, *MLP_TARGETS, EXPERTS_TARGET)
LORA = "lora"  # the adapters' child name: parameter names contain ".lora."
# Each factor's base weight attribute and the dimension of the factor that holds the rank.
FACTORS = {"A": ("weight", 0), "B": ("weight", 1), "w13_A": ("w13", 1), "w13_B": ("w13", 2),
           "w2_A": ("w2", 1), "w2_B": ("w2", 2)}


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    ``targets``: projection names (``q_proj`` ... ``o_proj``, the dense MLP's ``gate_proj``,
    ``up_proj``, ``down_proj``) and ``experts`` (every expert's ``w13`` and ``w2``).
    ``train_router``: the MoE routers' weights train too (in full: they are small)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (*ATTENTION_TARGETS, EXPERTS_TARGET)
    train_router: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets {bad or '[]'} are not among {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kaiming_A(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None
               ) -> torch.Tensor:
    """nn.Linear's (and PEFT's) default init for ``A``: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class LinearLoRA(nn.Module):
    """The adapter of one projection: ``forward(x)`` is the delta ``scale * B(A(dropout(x)))``,
    computed in the adapters' dtype and returned in ``x``'s."""

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.scale = cfg.scale
        self.A = nn.Parameter(_kaiming_A((cfg.rank, in_features), in_features, generator))
        self.B = nn.Parameter(torch.zeros(out_features, cfg.rank))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.hook: torch.utils.hooks.RemovableHandle | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else self.A.dtype
        low = F.linear(self.dropout(x).to(dtype), self.A.to(dtype))
        return (F.linear(low, self.B.to(dtype)) * self.scale).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` [out, in] in fp32."""
        return (self.B.float() @ self.A.float()) * self.scale


def _add_delta(module: nn.Module, inputs: tuple[torch.Tensor, ...],
               output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, LORA)(inputs[0])


class ExpertLoRA(nn.Module):
    """One adapter per expert on the stacked expert weights (shapes in the module docstring).

    ``delta13`` / ``delta2`` give the low-rank part of the two projections for rows sorted by
    expert (``counts`` rows for each of the experts ``first, first + 1, ...``), with the same
    grouped matmuls as the base weights."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, cfg: LoRAConfig,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        e, r = num_experts, cfg.rank
        self.scale = cfg.scale
        self.w13_A = nn.Parameter(_kaiming_A((e, r, hidden), hidden, generator))
        self.w13_B = nn.Parameter(torch.zeros(e, 2 * ffn, r))
        self.w2_A = nn.Parameter(_kaiming_A((e, r, ffn), ffn, generator))
        self.w2_B = nn.Parameter(torch.zeros(e, hidden, r))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def _delta(self, A: torch.Tensor, B: torch.Tensor, x_SI: torch.Tensor, counts: list[int],
               first: int) -> torch.Tensor:
        last = first + len(counts)
        dtype = x_SI.dtype
        low_SR = grouped_linear(self.dropout(x_SI), A[first:last].to(dtype), counts)
        return grouped_linear(low_SR, B[first:last].to(dtype), counts) * self.scale

    def delta13(self, x_SH: torch.Tensor, counts: list[int], first: int = 0) -> torch.Tensor:
        return self._delta(self.w13_A, self.w13_B, x_SH, counts, first)

    def delta2(self, a_SF: torch.Tensor, counts: list[int], first: int = 0) -> torch.Tensor:
        return self._delta(self.w2_A, self.w2_B, a_SF, counts, first)

    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale * B @ A`` of every expert, fp32: ([E, 2F, H], [E, H, F])."""
        return ((torch.bmm(self.w13_B.float(), self.w13_A.float()) * self.scale),
                (torch.bmm(self.w2_B.float(), self.w2_A.float()) * self.scale))


def _lora_sites(model: nn.Module, targets: tuple[str, ...]
                ) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, module, kind) of every module ``targets`` selects; kind is "linear"
    or "experts"."""
    for name, module in model.named_modules():
        attr = name.rpartition(".")[2]
        if attr in targets and attr in ATTENTION_TARGETS + MLP_TARGETS and hasattr(
                module, "weight") and module.weight.dim() == 2:
            yield name, module, "linear"
        elif attr == EXPERTS_TARGET and EXPERTS_TARGET in targets and hasattr(module, "w13"):
            yield name, module, "experts"


def add_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze ``model``'s parameters and add adapters (fp32, on the model's device) where
    ``cfg`` says; returns the names of the adapted modules.
    ``seed`` makes the ``A`` factors the same on every process (each adapter draws from its
    own seeded generator, so a model part, such as a pipeline stage, gets the same factors as
    the whole model)."""
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    adapted = []
    for name, module, kind in list(_lora_sites(model, cfg.targets)):
        if hasattr(module, LORA) and getattr(module, LORA) is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
        generator = torch.Generator().manual_seed(_name_seed(seed, name))
        if kind == "linear":
            out_features, in_features = module.weight.shape
            lora = LinearLoRA(in_features, out_features, cfg, generator).to(device)
            module.add_module(LORA, lora)
            lora.hook = module.register_forward_hook(_add_delta)
        else:
            module.lora = ExpertLoRA(module.num_experts, module.w13.shape[2],
                                     module.w13.shape[1] // 2, cfg, generator).to(device)
        adapted.append(name)
    if not adapted:
        raise ValueError(f"no module of the model matches the LoRA targets {list(cfg.targets)}")
    if cfg.train_router:
        for module in model.modules():
            if isinstance(module, MoEBlock):
                module.gate.requires_grad_(True)
    return adapted


def _name_seed(seed: int, name: str) -> int:
    """A per-module seed that depends on the module's name only (stable across processes)."""
    h = seed & 0xFFFFFFFF
    for byte in name.encode():
        h = (h * 1_000_003 + byte) & 0x7FFFFFFFFFFFFFFF
    return h


def factor_of(name: str) -> tuple[str, str] | None:
    """(base weight name, factor) of an adapter parameter name (``...q_proj.lora.A`` ->
    (``...q_proj.weight``, ``A``); ``...experts.lora.w13_B`` -> (``...experts.w13``,
    ``w13_B``)), or None for any other name."""
    site, sep, factor = name.rpartition(f".{LORA}.")
    if not sep or factor not in FACTORS:
        return None
    return f"{site}.{FACTORS[factor][0]}", factor


def factor_shape(factor: str, weight_shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape of adapter ``factor`` of rank ``rank`` for a base weight of ``weight_shape``
    (``[out, in]``, or stacked experts' ``[E, out, in]``): ``A`` takes the input dimension,
    ``B`` the output one."""
    *experts, out_features, in_features = weight_shape
    if factor.endswith("A"):
        return (*experts, rank, in_features)
    return (*experts, out_features, rank)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by qualified name (``...q_proj.lora.A``)."""
    return {n: p for n, p in model.named_parameters() if f".{LORA}." in f".{n}"}


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weights (in fp32, cast back to the weights' dtype) and
    remove it; returns the merged modules' names. Modules whose weights are not plain tensors
    (FP8) cannot be merged in place: merge the checkpoint instead (``skymoe merge``)."""
    merged = []
    for name, module in list(model.named_modules()):
        lora = getattr(module, LORA, None)
        if isinstance(lora, LinearLoRA):
            _fold(name, module, "weight", lora.delta_weight())
        elif isinstance(lora, ExpertLoRA):
            d13, d2 = lora.delta_weights()
            _fold(name, module, "w13", d13)
            _fold(name, module, "w2", d2)
        else:
            continue
        _remove(module)
        merged.append(name)
    return merged


def remove_lora(model: nn.Module) -> None:
    """Drop every adapter from ``model``; its base weights stay as they are."""
    for module in model.modules():
        if isinstance(getattr(module, LORA, None), (LinearLoRA, ExpertLoRA)):
            _remove(module)


def _remove(module: nn.Module) -> None:
    lora = getattr(module, LORA)
    if isinstance(lora, LinearLoRA):
        lora.hook.remove()
        del module._modules[LORA]
    else:
        module.lora = None


def _fold(name: str, module: nn.Module, attr: str, delta: torch.Tensor) -> None:
    w = getattr(module, attr)
    if hasattr(module, f"{attr}_scale") or w.element_size() < 2:  # FP8 values and scales
        raise ValueError(f"{name}.{attr} is {w.dtype}: merge the adapter into the checkpoint "
                         "(skymoe merge) instead of in memory")
    w.copy_((w.float() + delta.to(w.device)).to(w.dtype))


__all__ = ["ExpertLoRA", "FACTORS", "LinearLoRA", "LoRAConfig", "TARGETS", "add_lora",
           "factor_of", "factor_shape", "lora_parameters", "merge_lora", "remove_lora"]
