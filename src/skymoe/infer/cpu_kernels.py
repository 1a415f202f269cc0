"""CPU inference modules: oneDNN (mkldnn) prepacked linear layers and experts.

On CPU, ``F.linear`` re-lays out the weight on every call; oneDNN's prepacked weights skip that
and run small-batch (decode) matmuls 1.5-2.5x faster with identical bf16 results. They are what
``skymoe.infer.prepare`` swaps in where the native kernels are not loaded (``packed_version``
is its rule); the packed model is for inference only (no gradients, and it cannot be saved:
save before preparing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import UsesKernels
from ..model.moe import SwiGLUExperts, dispatch_sorted


def can_pack(model: nn.Module) -> bool:
    """oneDNN packing applies to CPU models in fp32, or bf16 where the CPU supports it."""
    param = next(model.parameters())
    if param.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if param.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return param.dtype == torch.float32


def _pack(weight_OI: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight_OI.detach().contiguous(), 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedLinear(nn.Module):
    """Bias-free linear layer with a oneDNN-packed weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed)


class PackedExperts(UsesKernels, nn.Module):
    """SwiGLU experts with one packed weight per expert; tokens grouped by expert (the
    gather and combine around them computed with ``kernels``)."""

    def __init__(self, experts: SwiGLUExperts) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        self.kernels = experts.kernels
        self.w13 = [_pack(w) for w in experts.w13]
        self.w2 = [_pack(w) for w in experts.w2]

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        if expert_ids_TK.shape[0] == 1:
            return self._single_token(x_TH, expert_ids_TK[0].tolist(), weights_TK[0])
        return dispatch_sorted(x_TH, expert_ids_TK, weights_TK, self.num_experts, self._ffn,
                               kernels=self.kernels)

    def _ffn(self, x_sorted_SH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = torch.empty_like(x_sorted_SH)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out[start:start + n] = self._expert(x_sorted_SH[start:start + n], e)
                start += n
        return out

    def _expert(self, x_NH: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = _packed_linear(x_NH, self.w13[e]).chunk(2, -1)
        return _packed_linear(F.silu(gate) * up, self.w2[e])

    def _single_token(self, x_1H: torch.Tensor, experts: list[int],
                      weights_K: torch.Tensor) -> torch.Tensor:
        """Decode of one sequence: k experts, no sorting or scattering needed."""
        out = None
        for slot, e in enumerate(experts):
            y = self._expert(x_1H, e) * weights_K[slot]
            out = y if out is None else out + y
        return out.to(x_1H.dtype)


def packed_version(name: str, parent: nn.Module, child: nn.Module) -> nn.Module | None:
    """The packed replacement of ``child`` (attribute ``name`` of ``parent``), or None to keep
    it: experts and linear layers, except the fp32 router (``gate``, or the 2-layer gate's
    Sequential)."""
    if isinstance(child, SwiGLUExperts):
        return PackedExperts(child)
    attr = name.rpartition(".")[2]
    if isinstance(child, nn.Linear) and attr != "gate" and not isinstance(parent, nn.Sequential):
        return PackedLinear(child)
    return None
