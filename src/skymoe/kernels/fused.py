"""Fused CPU kernels for training's elementwise hot spots (compiled in ``skymoe.kernels.native``).

Eager PyTorch makes one pass over memory per op. SwiGLU's backward (silu backward, two
multiplies, then a concatenation of the two halves' gradients), the cross-entropy's softmax over
a 32k vocabulary, and the MoE's gather/weight/unsort/sum around the experts were about a quarter
of a bench-config CPU training step. The native kernels do each in one pass, computing in fp32
and rounding to the tensor dtype where the PyTorch ops round (bf16 results are bit-identical to
them in tests). Each function here takes the loaded extension (``native``) explicitly; which
tensors it serves is decided by ``skymoe.kernels.Kernels``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``); True where torch
    cannot say."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


class _NativeSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, consume_input: bool, native: ModuleType) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.consume_input, ctx.native = consume_input, native
        return native.swiglu_forward(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (h,) = ctx.saved_tensors
        # A consumed input is dead after this backward unless the graph is kept: its memory
        # takes the gradient, which saves allocating (and page-faulting) a tensor as large.
        in_place = ctx.consume_input and not _graph_kept()
        return ctx.native.swiglu_backward(h, grad_out.contiguous(), in_place), None, None


def swiglu(native: ModuleType, h: torch.Tensor, consume_input: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of ``h = [gate | up]`` by the native kernel, forward and backward
    (see ``Kernels.swiglu``)."""
    return _NativeSwiGLU.apply(h.contiguous(), consume_input, native)


class _GatherRows(torch.autograd.Function):
    """``x[src]``; backward sums each token's rows back (``combine_rows`` without weights)
    instead of PyTorch's zero-fill plus accumulate-scatter."""

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, src_S: torch.Tensor, pos_TK: torch.Tensor,
                native: ModuleType) -> torch.Tensor:
        ctx.save_for_backward(pos_TK)
        ctx.native = native
        return x_TH.index_select(0, src_S)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SH: torch.Tensor):
        (pos_TK,) = ctx.saved_tensors
        grad = ctx.native.combine_rows(grad_SH.contiguous(), pos_TK, None, False)
        return grad, None, None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SH: torch.Tensor, pos_TK: torch.Tensor, weights_TK: torch.Tensor,
                float_out: bool, native: ModuleType) -> torch.Tensor:
        ctx.save_for_backward(y_SH, pos_TK, weights_TK)
        ctx.native = native
        return native.combine_rows(y_SH, pos_TK, weights_TK, float_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TH: torch.Tensor):
        y_SH, pos_TK, weights_TK = ctx.saved_tensors
        grad_y, grad_w = ctx.native.combine_rows_backward(grad_TH.contiguous(), y_SH, pos_TK,
                                                          weights_TK)
        return grad_y, None, grad_w, None, None


def gather_rows(native: ModuleType, x_TH: torch.Tensor, src_S: torch.Tensor,
                pos_TK: torch.Tensor) -> torch.Tensor:
    """Rows ``x_TH[src_S]`` where row s is the assignment at ``pos_TK == s`` (the sorted
    order's inverse), with the native backward."""
    return _GatherRows.apply(x_TH, src_S, pos_TK, native)


def combine_rows(native: ModuleType, y_SH: torch.Tensor, pos_TK: torch.Tensor,
                 weights_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * y[pos[t, k]]`` in fp32, cast to ``dtype``; positions
    ``>= len(y)`` (dropped assignments) add nothing. Native forward and backward."""
    out = _CombineRows.apply(y_SH.contiguous(), pos_TK, weights_TK.float().contiguous(),
                             dtype != y_SH.dtype, native)
    return out.to(dtype)
