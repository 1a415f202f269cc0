"""Inference modules that run decode steps through the native CPU kernels.

Each replaces a model module, keeps its weights and has the attributes of the module it
replaces, set explicitly (attention and experts are subclasses of the modules they replace;
the decoder layer names what it exposes). A forward with few rows (a decode step) goes to one
native call, anything larger (prefill) to the PyTorch path. FP8 modules become native FP8
modules that hold one byte per weight (values held widened are narrowed back to e4m3, exactly)
and whose decode kernels widen them in registers, applying each weight row's scale to its fp32
dot product. ``native_version`` is the rule that ``skymoe.infer.prepare`` walks the model with.
For inference only.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..model.fp8 import FP8_DTYPE, Fp8Experts, Fp8Linear
from ..model.layers import Attention, KVCache, RMSNorm, SlotKVCache
from ..model.moe import NORM_EPS, MoEBlock, SwiGLUExperts
from ..model.transformer import DecoderLayer

# At most this many rows (tokens) per call take the native matmul kernel; beyond it oneDNN's
# GEMMs, which reuse each weight tile across many rows, are faster.
NATIVE_MAX_ROWS = 16
# Decode steps of up to this many sequences run natively: their experts see a few rows each,
# and the PyTorch path's per-row cache gathers and masks cost more than the attention matmuls.
NATIVE_MAX_DECODE_ROWS = 64
# FP8 experts take the native kernel up to this many routed rows per expert on average (a
# prefill of a few hundred tokens): it reads each one-byte weight once per 8 rows, where the
# GEMM path would first write every expert's widened weights to memory.
NATIVE_FP8_ROWS_PER_EXPERT = 16

_NONE = torch.empty(0, dtype=torch.long)  # an absent optional tensor argument of the kernels
_NO_SCALE = torch.empty(0)  # the row scales of weights in the model dtype: none
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class NativeLinear(nn.Module):
    """Bias-free linear layer of ``weight`` [out, in]: the native kernel for a few rows,
    ``F.linear`` for more."""

    def __init__(self, weight: nn.Parameter, native: ModuleType) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.native = native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > NATIVE_MAX_ROWS:
            return F.linear(x, self.weight)
        y = self.native.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.weight)
        return y.view(*x.shape[:-1], -1)


class WideningBuffer:
    """Where a prepared model's FP8 modules widen their values for a prefill's GEMMs: one bf16
    buffer, grown to the largest matrix (group) and reused, widened into at memory speed by the
    native kernel (torch's float8 conversion runs under 1 GB/s, and a fresh buffer per call
    faults its pages in each time: 3 GB/s). A widened matrix is valid until the next widening,
    so each is used by its matmul at once; a model runs its forward on one thread."""

    def __init__(self, native: ModuleType) -> None:
        self.native = native
        self.buffer = torch.empty(0, dtype=torch.bfloat16)

    def widened(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.buffer.numel() < w.numel():
            self.buffer = torch.empty(w.numel(), dtype=torch.bfloat16)
        out = self.buffer[:w.numel()].view(w.shape)
        self.native.fp8_to_bf16(w.contiguous(), out)
        return out if dtype == torch.bfloat16 else out.to(dtype)


def _fp8_values(t: torch.Tensor) -> torch.Tensor:
    """FP8 weight values at one byte each (values held widened are e4m3 values: exact)."""
    return (t if t.dtype == FP8_DTYPE else t.to(FP8_DTYPE)).contiguous()


def _fp8_row_scales(linear: Fp8Linear) -> torch.Tensor:
    """One fp32 scale per output row of an FP8 linear layer (a per-tensor scale repeated)."""
    return linear.weight_scale.float().reshape(-1).expand(linear.weight.shape[0]).contiguous()


class NativeFp8Linear(Fp8Linear):
    """An FP8 linear layer of one-byte ``values`` [out, in] and per-row ``row_scales`` [out]:
    a few rows go through the native kernel (each row's scale applied to its fp32 dot
    products), more through ``Fp8Linear.forward`` on the same tensors."""

    def __init__(self, values: torch.Tensor, row_scales: torch.Tensor,
                 widening: WideningBuffer) -> None:
        with torch.device("meta"):  # the base class's buffers are replaced below
            super().__init__(values.shape[0], values.shape[1], per_channel=True, keep_fp8=True)
        self.weight, self.weight_scale = values, row_scales.view(-1, 1)
        self.row_scales = row_scales
        self.widening, self.native = widening, widening.native

    def widened(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.widening.widened(w, dtype)

    @classmethod
    def of(cls, linear: Fp8Linear, widening: WideningBuffer) -> "NativeFp8Linear":
        return cls(_fp8_values(linear.weight), _fp8_row_scales(linear), widening)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > NATIVE_MAX_ROWS:
            return super().forward(x)
        y = self.native.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.weight,
                               self.row_scales)
        return y.view(*x.shape[:-1], -1)


class NativeRMSNorm(RMSNorm):
    """RMSNorm computed by the native kernel for a few rows (same rounding as the module)."""

    def __init__(self, norm: RMSNorm, native: ModuleType) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.native = native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > NATIVE_MAX_ROWS or x.dtype != self.weight.dtype:
            return super().forward(x)
        return self.native.rms_norm(x.contiguous(), self.weight, self.eps)


class NativeAttention(Attention):
    """Attention whose single-token steps over a KV cache run as one native call.

    The q/k/v weights are concatenated once (``wqkv``; FP8 values with their row scales
    ``wqkv_scale``); the q/k/v projections are views of that tensor (no second copy), so
    prefill runs ``Attention.forward`` on the same weights.
    """

    def __init__(self, attn: Attention, widening: WideningBuffer) -> None:
        q, k, v, o = (getattr(attn, name) for name in _PROJECTIONS)
        native = widening.native
        with torch.device("meta"):  # the base class's projections are replaced below
            super().__init__(q.in_features, attn.heads, attn.kv_heads, attn.head_dim,
                             attn.layer_idx, attn.sliding_window)
        fp8 = isinstance(q, Fp8Linear)
        with torch.no_grad():
            self.wqkv = torch.cat([_fp8_values(m.weight) if fp8 else m.weight
                                   for m in (q, k, v)])
            self.wqkv_scale = (torch.cat([_fp8_row_scales(m) for m in (q, k, v)]) if fp8
                               else _NO_SCALE)
        nq, nkv = q.out_features, k.out_features
        for name, rows in (("q_proj", slice(0, nq)), ("k_proj", slice(nq, nq + nkv)),
                           ("v_proj", slice(nq + nkv, None))):
            part = self.wqkv[rows]
            setattr(self, name, NativeFp8Linear(part, self.wqkv_scale[rows], widening) if fp8
                    else NativeLinear(nn.Parameter(part, requires_grad=False), native))
        self.o_proj = (NativeFp8Linear.of(o, widening) if fp8
                       else NativeLinear(o.weight, native))
        self.wo_scale = self.o_proj.row_scales if fp8 else _NO_SCALE
        self.native = native

    @staticmethod
    def applies(attn: nn.Module) -> bool:
        """A plain ``Attention`` whose projections are all bias-free ``nn.Linear`` layers with
        contiguous weights, or all FP8 linear layers (not tensor-parallel variants)."""
        projections = [getattr(attn, name, None) for name in _PROJECTIONS]
        return type(attn) is Attention and (all(map(_plain_linear, projections)) or all(
            type(m) is Fp8Linear for m in projections))

    def decode_args(self, x_BTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: KVCache | SlotKVCache | None, start: int) -> tuple | None:
        """The step's native attention arguments (rotary, caches, where each row goes), or
        None when the step is not a single-token decode over a cache (PyTorch runs it)."""
        b, t, _ = x_BTH.shape
        if t != 1 or cache is None or b > NATIVE_MAX_DECODE_ROWS:
            return None
        layer = self.layer_idx
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
        """The kernel's weight arguments: qkv, o, head counts, sliding window and the row
        scales of FP8 weights (empty otherwise)."""
        return (self.wqkv, self.o_proj.weight, self.heads, self.kv_heads,
                self.sliding_window or 0, self.wqkv_scale, self.wo_scale)

    def forward(self, x_BTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        step = self.decode_args(x_BTH, cos, sin, cache, start) if mask is None else None
        if step is None:
            return super().forward(x_BTH, cos, sin, cache, start, mask)
        b, _, hidden = x_BTH.shape
        out = self.native.attention_decode(x_BTH.reshape(b, hidden).contiguous(), *step,
                                           *self.weight_args())
        return out.view(b, 1, -1)


class NativeExperts(SwiGLUExperts):
    """SwiGLU experts: a few tokens through the native kernel, more through the grouped GEMMs
    (``SwiGLUExperts.forward`` on the same weights)."""

    def __init__(self, experts: SwiGLUExperts, native: ModuleType) -> None:
        with torch.device("meta"):  # the base class's parameters are replaced below
            super().__init__(experts.num_experts, experts.w13.shape[2], experts.ffn,
                             experts.impl)
        self.w13, self.w2 = experts.w13, experts.w2
        self.kernels = experts.kernels
        self.native = native

    def decode_weights(self) -> tuple[torch.Tensor, ...]:
        """The kernel's expert arguments: w13, w2 and their row scales (none here)."""
        return self.w13, self.w2, _NO_SCALE, _NO_SCALE

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        if x_TH.shape[0] > NATIVE_MAX_ROWS or keep_TK is not None:
            return super().forward(x_TH, expert_ids_TK, weights_TK, keep_TK)
        return _experts_decode(self, x_TH, expert_ids_TK, weights_TK)


class NativeFp8Experts(Fp8Experts):
    """FP8 experts holding one byte per weight: a few tokens through the native kernel (each
    weight row's scale, ``w13_rows`` [E, 2F] and ``w2_rows`` [E, H], applied to its fp32 dot
    products), more through ``Fp8Experts.forward`` on the same tensors."""

    def __init__(self, experts: Fp8Experts, widening: WideningBuffer) -> None:
        e, hidden, ffn = experts.num_experts, experts.w13.shape[2], experts.ffn
        with torch.device("meta"):  # the base class's buffers are replaced below
            super().__init__(e, hidden, ffn, keep_fp8=True)
        self.w13, self.w2 = _fp8_values(experts.w13), _fp8_values(experts.w2)
        self.w13_scale, self.w2_scale = experts.w13_scale, experts.w2_scale
        self.w13_rows = experts.w13_scale.float().repeat_interleave(ffn, dim=1).contiguous()
        self.w2_rows = experts.w2_scale.float()[:, None].expand(e, hidden).contiguous()
        self.kernels = experts.kernels
        self.widening, self.native = widening, widening.native

    def widened(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.widening.widened(w, dtype)

    def decode_weights(self) -> tuple[torch.Tensor, ...]:
        """The kernel's expert arguments: w13, w2 and their row scales."""
        return self.w13, self.w2, self.w13_rows, self.w2_rows

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        if (expert_ids_TK.numel() > NATIVE_FP8_ROWS_PER_EXPERT * self.num_experts
                or keep_TK is not None):
            return super().forward(x_TH, expert_ids_TK, weights_TK, keep_TK)
        return _experts_decode(self, x_TH, expert_ids_TK, weights_TK)


def _experts_decode(experts: NativeExperts | NativeFp8Experts, x_TH: torch.Tensor,
                    expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    w13, w2, s13, s2 = experts.decode_weights()
    return experts.native.experts_decode(x_TH.contiguous(), w13, w2, expert_ids_TK.contiguous(),
                                         weights_TK.float().contiguous(), s13, s2)


class NativeMoEDecoderLayer(nn.Module):
    """A MoE decoder layer (already holding native attention, norms and experts) whose decode
    steps run as one native call: norms, attention, routing, experts and both residuals.

    Called like ``DecoderLayer`` and returns what it returns; other steps run the wrapped
    ``layer``. Exposes the layer's ``self_attn``, ``block_sparse_moe`` and ``ffn``.
    """

    def __init__(self, layer: DecoderLayer, native: ModuleType) -> None:
        super().__init__()
        self.layer = layer
        self.native = native
        self.layer_idx = layer.layer_idx
        self.recompute = False  # inference only: nothing to recompute
        moe = layer.block_sparse_moe
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        # Everything but the step's input, as the kernel takes it (a plain tuple: no module
        # attribute lookups per step).
        self.weight_args = (
            norm1.weight, norm2.weight, norm1.eps, *layer.self_attn.weight_args(),
            moe.gate.weight.detach().float().contiguous(),
            (moe.expert_bias.float().contiguous() if moe.expert_bias is not None
             else torch.empty(0)), moe.top_k, moe.use_logits_norm,
            moe.norm_scale, NORM_EPS, moe.mul_topk, *moe.experts.decode_weights())

    @property
    def self_attn(self) -> NativeAttention:
        return self.layer.self_attn

    @property
    def block_sparse_moe(self) -> MoEBlock:
        return self.layer.block_sparse_moe

    @property
    def ffn(self) -> MoEBlock:
        return self.layer.ffn

    @staticmethod
    def applies(layer: nn.Module) -> bool:
        """A MoE ``DecoderLayer`` with a single-linear router whose attention, norms and
        experts are already native, in one dtype (the weights possibly FP8)."""
        moe = getattr(layer, "block_sparse_moe", None)
        return (type(layer) is DecoderLayer and isinstance(moe, MoEBlock)
                and type(moe.gate) is nn.Linear
                and isinstance(moe.experts, (NativeExperts, NativeFp8Experts))
                and isinstance(layer.self_attn, NativeAttention)
                and isinstance(layer.input_layernorm, NativeRMSNorm)
                and isinstance(layer.post_attention_layernorm, NativeRMSNorm)
                and layer.self_attn.wqkv.dtype in (layer.input_layernorm.weight.dtype,
                                                   FP8_DTYPE))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, start: int | None = None,
                balance: None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, None]:
        """``DecoderLayer.forward`` for inference (no MoE training output)."""
        step = self.layer.self_attn.decode_args(x, cos, sin, cache, start or 0)
        if step is None or mask is not None or x.dtype != self.weight_args[0].dtype:
            return self.layer(x, cos, sin, cache, start, mask=mask)
        b, _, hidden = x.shape
        out = self.native.moe_layer_decode(x.reshape(b, hidden).contiguous(), *step,
                                           *self.weight_args)
        return out.view(b, 1, hidden), None


def native_version(widening: WideningBuffer, name: str, parent: nn.Module,
                   child: nn.Module) -> nn.Module | None:
    """The native replacement of ``child`` (attribute ``name`` of ``parent``), or None to keep
    it (``widening``: the model's buffer for FP8 prefills, with the native kernels). The router
    (``gate``, or the 2-layer gate's Sequential) stays an fp32 ``nn.Linear``."""
    native = widening.native
    if NativeAttention.applies(child):
        return NativeAttention(child, widening)
    if type(child) is SwiGLUExperts and child.w13.is_contiguous() and child.w2.is_contiguous():
        return NativeExperts(child, native)
    if type(child) is Fp8Experts and child.lora is None:
        return NativeFp8Experts(child, widening)
    if type(child) is RMSNorm:
        return NativeRMSNorm(child, native)
    if NativeMoEDecoderLayer.applies(child):
        return NativeMoEDecoderLayer(child, native)
    if NativeAttention.applies(parent):
        return None  # the attention's projections become views of its concatenated weight
    attr = name.rpartition(".")[2]
    if _plain_linear(child) and attr != "gate" and not isinstance(parent, nn.Sequential):
        return NativeLinear(child.weight, native)
    if type(child) is Fp8Linear:
        return NativeFp8Linear.of(child, widening)
    return None


def _plain_linear(module: nn.Module) -> bool:
    """A bias-free nn.Linear (not an FP8 or tensor-parallel variant) with a contiguous weight."""
    return type(module) is nn.Linear and module.bias is None and module.weight.is_contiguous()
