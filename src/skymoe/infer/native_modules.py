"""Inference modules that run decode steps through the native CPU kernels.

Each wraps (or replaces) a model module and keeps its weights; a forward with few rows (a
decode step) goes to one native call, anything larger (prefill) to the PyTorch path. Swapped
into a model from outside by ``apply_native_kernels``; the model never knows. For inference only.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Attention, KVCache, RMSNorm, SlotKVCache
from ..model.moe import NORM_EPS, MoEBlock, SwiGLUExperts
from ..model.transformer import DecoderLayer, SkyworkForCausalLM

# At most this many rows (tokens) per call take the native matmul kernel; beyond it oneDNN's
# GEMMs, which reuse each weight tile across many rows, are faster.
NATIVE_MAX_ROWS = 16
# Decode steps of up to this many sequences run natively: their experts see a few rows each,
# and the PyTorch path's per-row cache gathers and masks cost more than the attention matmuls.
NATIVE_MAX_DECODE_ROWS = 64

_NONE = torch.empty(0, dtype=torch.long)  # an absent optional tensor argument of the kernels


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class _Wrapper(nn.Module):
    """Wraps ``inner`` transparently: attributes it does not have itself come from ``inner``
    (the model reads e.g. ``layer.self_attn.kv_heads`` whatever the module is)."""

    def __init__(self, inner: nn.Module, kernels: ModuleType) -> None:
        super().__init__()
        self.inner = inner
        self.kernels = kernels

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class NativeLinear(nn.Module):
    """Bias-free linear layer: the native kernel for a few rows, ``F.linear`` for more."""

    def __init__(self, linear: nn.Linear, kernels: ModuleType) -> None:
        super().__init__()
        self.weight = linear.weight
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > NATIVE_MAX_ROWS:
            return F.linear(x, self.weight)
        y = self.kernels.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.weight)
        return y.view(*x.shape[:-1], -1)


class NativeRMSNorm(RMSNorm):
    """RMSNorm computed by the native kernel for a few rows (same rounding as the module)."""

    def __init__(self, norm: RMSNorm, kernels: ModuleType) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > NATIVE_MAX_ROWS or x.dtype != self.weight.dtype:
            return super().forward(x)
        return self.kernels.rms_norm(x.contiguous(), self.weight, self.eps)


class NativeAttention(_Wrapper):
    """Attention whose single-token steps over a KV cache run as one native call.

    The q/k/v weights are concatenated once; the wrapped module's projections become views of
    that tensor (no second copy), so prefill runs the wrapped module unchanged.
    """

    def __init__(self, attn: Attention, kernels: ModuleType) -> None:
        super().__init__(attn, kernels)
        with torch.no_grad():
            wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        nq, nkv = attn.q_proj.out_features, attn.k_proj.out_features
        for proj, part in ((attn.q_proj, wqkv[:nq]), (attn.k_proj, wqkv[nq:nq + nkv]),
                           (attn.v_proj, wqkv[nq + nkv:])):
            proj.weight = nn.Parameter(part, requires_grad=False)
        self.wqkv = wqkv

    def decode_args(self, x_BTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: KVCache | SlotKVCache | None, start: int) -> tuple | None:
        """The step's native attention arguments (rotary, caches, where each row goes), or
        None when the step is not a single-token decode over a cache (PyTorch runs it)."""
        b, t, _ = x_BTH.shape
        if t != 1 or cache is None or b > NATIVE_MAX_DECODE_ROWS:
            return None
        layer = self.inner.layer_idx
        if isinstance(cache, SlotKVCache):
            rows, positions = cache.current()
            return (cos, sin, cache.keys[layer], cache.values[layer], rows,
                    positions[:, 0].contiguous(), 0, 1)
        if start + 1 > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked to write up to "
                             f"{start + 1}")
        # Row b is cache row b, all rows at position ``start``.
        return cos, sin, cache.keys[layer], cache.values[layer], _NONE, _NONE, start, 2

    def weight_args(self) -> tuple:
        a = self.inner
        return self.wqkv, a.o_proj.weight, a.heads, a.kv_heads, a.sliding_window or 0

    def forward(self, x_BTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, start: int = 0) -> torch.Tensor:
        step = self.decode_args(x_BTH, cos, sin, cache, start)
        if step is None:
            return self.inner(x_BTH, cos, sin, cache, start)
        b, _, hidden = x_BTH.shape
        out = self.kernels.attention_decode(x_BTH.reshape(b, hidden).contiguous(), *step,
                                            *self.weight_args())
        return out.view(b, 1, -1)


class NativeExperts(_Wrapper):
    """SwiGLU experts: a few tokens through the native kernel, more through the grouped GEMMs."""

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        if x_TH.shape[0] > NATIVE_MAX_ROWS:
            return self.inner(x_TH, expert_ids_TK, weights_TK)
        return self.kernels.experts_decode(
            x_TH.contiguous(), self.inner.w13, self.inner.w2, expert_ids_TK.contiguous(),
            weights_TK.float().contiguous())


class NativeMoEDecoderLayer(_Wrapper):
    """A MoE decoder layer (already holding native attention, norms and experts) whose decode
    steps run as one native call: norms, attention, routing, experts and both residuals."""

    def __init__(self, layer: DecoderLayer, kernels: ModuleType) -> None:
        super().__init__(layer, kernels)
        moe = layer.block_sparse_moe
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        # Everything but the step's input, as the kernel takes it (a plain tuple: no module
        # attribute lookups per step).
        self.weight_args = (
            norm1.weight, norm2.weight, norm1.eps, *layer.self_attn.weight_args(),
            moe.gate.weight.detach().float().contiguous(), moe.top_k, moe.use_logits_norm,
            moe.norm_scale, NORM_EPS, moe.mul_topk, moe.experts.inner.w13,
            moe.experts.inner.w2)

    @staticmethod
    def applies(layer: nn.Module) -> bool:
        moe = getattr(layer, "block_sparse_moe", None)
        return (isinstance(layer, DecoderLayer) and isinstance(moe, MoEBlock)
                and type(moe.gate) is nn.Linear and isinstance(moe.experts, NativeExperts)
                and isinstance(layer.self_attn, NativeAttention)
                and isinstance(layer.input_layernorm, NativeRMSNorm)
                and isinstance(layer.post_attention_layernorm, NativeRMSNorm)
                and layer.input_layernorm.weight.dtype == layer.self_attn.wqkv.dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, start: int | None = None,
                balance: None = None) -> tuple[torch.Tensor, None]:
        """``DecoderLayer.forward`` for inference (no MoE training output)."""
        layer = self.inner
        step = layer.self_attn.decode_args(x, cos, sin, cache, start or 0)
        if step is None or x.dtype != self.weight_args[0].dtype:
            return layer(x, cos, sin, cache, start)
        b, _, hidden = x.shape
        out = self.kernels.moe_layer_decode(x.reshape(b, hidden).contiguous(), *step,
                                            *self.weight_args)
        return out.view(b, 1, hidden), None


def apply_native_kernels(model: SkyworkForCausalLM, kernels: ModuleType) -> SkyworkForCausalLM:
    """Swap attention, experts, RMSNorm and bias-free linear layers (not the fp32 router) for
    their native-kernel versions and wrap MoE layers for one-call decode steps, in place;
    returns the model (in eval mode, no gradients)."""
    model.eval().requires_grad_(False)
    for module in list(model.modules()):
        if isinstance(module, _Wrapper):
            continue  # already prepared: its wrapped module stays as it is
        for name, child in list(module.named_children()):
            replacement = _native_version(module, name, child, kernels)
            if replacement is not None:
                setattr(module, name, replacement)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if NativeMoEDecoderLayer.applies(layer):
            layers[i] = NativeMoEDecoderLayer(layer, kernels)
    return model


def _native_version(parent: nn.Module, name: str, child: nn.Module,
                    kernels: ModuleType) -> nn.Module | None:
    if type(child) is Attention and all(_plain_linear(getattr(child, proj)) for proj in
                                        ("q_proj", "k_proj", "v_proj", "o_proj")):
        return NativeAttention(child, kernels)
    if type(child) is SwiGLUExperts and child.w13.is_contiguous() and child.w2.is_contiguous():
        return NativeExperts(child, kernels)
    if type(child) is RMSNorm:
        return NativeRMSNorm(child, kernels)
    # The router (``gate``, or the 2-layer gate's Sequential) stays an fp32 nn.Linear.
    if _plain_linear(child) and name != "gate" and not isinstance(parent, nn.Sequential):
        return NativeLinear(child, kernels)
    return None


def _plain_linear(module: nn.Module) -> bool:
    """A bias-free nn.Linear (not an FP8 or tensor-parallel variant) with a contiguous weight."""
    return type(module) is nn.Linear and module.bias is None and module.weight.is_contiguous()
