"""FP8 weights in memory: linear layers and experts that keep the checkpoint's e4m3 values and
scales, so an FP8 model computes from exactly what was stored and re-saves without loss.

Kernels are chosen by capability, never by an import failing:

- CUDA sm_89+ with FP8 storage: ``torch._scaled_mm`` with dynamic per-tensor activation scaling
  (``amax(|x|) / 448``) and the weight's per-tensor scale;
- elsewhere: the e4m3 values are held in bf16 (exact: e4m3 has fewer mantissa and exponent bits
  than bf16) and the scale multiplies the matmul's output in fp32, so the result equals a
  matmul with the dequantized weight up to the matmul's own rounding. ``keep_fp8=True`` keeps
  one byte per value in memory instead and widens per call (slower; for when RAM is the limit);
- training through a frozen FP8 base (LoRA), on any device: the values are dequantized (value x
  scale, in the compute dtype) for each matmul and again in its backward, so only the one-byte
  values stay in memory (``torch._scaled_mm`` has no backward).

``use_fp8_modules`` gives a model this structure before a checkpoint fills it
(``skymoe.checkpoint.hf.load_model``); the format itself is ``skymoe.checkpoint.fp8``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import UsesKernels
from ..kernels.replace import replace_modules
from .layers import Attention
from .moe import SwiGLUExperts, dispatch_sorted, grouped_linear
from .transformer import DenseMLP, SkyworkForCausalLM

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 matmuls need an sm_89+ GPU (Ada, Hopper or newer)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def keeps_fp8_values(mode: str, device: torch.device) -> bool:
    """Whether FP8 modules on ``device`` hold one byte per value: always on sm_89+ GPUs (they
    multiply in FP8), elsewhere with ``mode == "keep"``. Raises ``ConfigError`` for "keep" on
    a device that cannot hold FP8 tensors."""
    if scaled_mm_supported(device):
        return True
    if mode != "keep":
        return False
    try:  # capability, not a list of device names: what the FP8 modules do with their values
        torch.zeros(1, dtype=FP8_DTYPE, device=device).to(torch.bfloat16)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"fp8='keep' on {device}: this device cannot hold FP8 values "
                          f"({reason}); load with fp8='auto' (values widened to bf16, exactly) "
                          "or fp8='dequantize'") from None
    return True


def _fp8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x @ (w_q * w_scale)^T`` through ``torch._scaled_mm`` with the activation quantized to
    e4m3 on the fly (one scale for the whole ``x``)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    x_scale = (x2.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    x_q = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if rows % 16:  # cuBLAS FP8 GEMMs take row counts in multiples of 16
        x_q = torch.cat((x_q, x_q.new_zeros(16 - rows % 16, x_q.shape[1])))
    # A scale that is a view into a stacked tensor is copied: cuBLAS wants its own pointer.
    w_scale = w_scale.reshape(()).float().clone()
    out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale,
                           out_dtype=torch.bfloat16)
    return out[:rows].to(x.dtype).view(*x.shape[:-1], w_q.shape[0])


def _use_scaled_mm(x: torch.Tensor, w: torch.Tensor, per_tensor: bool = True) -> bool:
    # _scaled_mm wants FP8 operands whose inner and outer sizes are multiples of 16.
    return (w.dtype == FP8_DTYPE and per_tensor and w.shape[-2] % 16 == 0
            and w.shape[-1] % 16 == 0 and scaled_mm_supported(x.device))


def _needs_input_grad(x: torch.Tensor) -> bool:
    # torch._scaled_mm has no backward: training through a frozen FP8 base (LoRA) dequantizes
    # the values per call instead (``_frozen_matmul``).
    return x.requires_grad and torch.is_grad_enabled()


def _widen(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype if dtype in (torch.float32, torch.bfloat16, torch.float16)
                else torch.bfloat16)


def _dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w * scale`` in ``dtype`` (computed in fp32, as ``--fp8 dequantize`` loads it); a
    stacked [E, ...] ``w`` one expert at a time, so the fp32 temporary is one expert's."""
    if w.dim() == 2:
        return (w.float() * scale).to(dtype)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    for e in range(w.shape[0]):
        out[e] = w[e].float() * scale[e]
    return out


class _FrozenDequantized(torch.autograd.Function):
    """``x @ (w * scale)^T`` (``counts``: per expert group, else one matrix) for frozen FP8
    values ``w``: the weight is dequantized in ``x``'s dtype for the matmul and again in the
    backward, so what is kept is the one-byte values (autograd would keep the dequantized
    copy, as many bytes as a bf16 base) and no fp32 product of activation size is formed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                counts: list[int] | None) -> torch.Tensor:
        ctx.save_for_backward(w, scale)
        ctx.counts = counts
        return _matmul(x, _dequantize(w, scale, x.dtype), counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        w, scale = ctx.saved_tensors
        wide = _dequantize(w, scale, grad.dtype)
        if ctx.counts is None:
            return grad @ wide, None, None, None
        return (grouped_linear(grad, wide.transpose(-2, -1).contiguous(), ctx.counts),
                None, None, None)


def _frozen_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                   counts: list[int] | None = None) -> torch.Tensor:
    """``x @ (w * scale)^T`` in training through a frozen FP8 base (``scale`` broadcast to
    ``w``'s shape: [out, 1], or [E, out, 1] for stacked experts), in the autocast dtype
    when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):  # as autocast casts F.linear's input
        x = x.to(torch.get_autocast_dtype(x.device.type))
    with torch.autocast(x.device.type, enabled=False):
        return _FrozenDequantized.apply(x, w, scale, counts)


def _trains_through(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` needs a gradient through the frozen FP8 values ``w`` (LoRA)."""
    return _needs_input_grad(x) and w.dtype == FP8_DTYPE


def _matmul(x: torch.Tensor, wide: torch.Tensor, counts: list[int] | None = None
            ) -> torch.Tensor:
    return F.linear(x, wide) if counts is None else grouped_linear(x, wide, counts)


class _Widens:
    """How an FP8 module widens its values for a matmul in ``dtype`` (native modules for
    inference override it with a faster kernel)."""

    def widened(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _widen(w, dtype).to(dtype)


class Fp8Linear(_Widens, nn.Module):
    """A bias-free linear layer from FP8 values ``weight`` [out, in] and fp32 ``weight_scale``
    (one per tensor, or [out, 1] per output channel)."""

    def __init__(self, out_features: int, in_features: int, per_channel: bool = False,
                 keep_fp8: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        dtype = FP8_DTYPE if keep_fp8 else torch.bfloat16
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(
            (out_features, 1) if per_channel else (), dtype=torch.float32, device=device))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_input_grad(x) and _use_scaled_mm(x, self.weight,
                                                       self.weight_scale.numel() == 1):
            return _fp8_matmul(x, self.weight, self.weight_scale)
        if _trains_through(x, self.weight):
            return _frozen_matmul(x, self.weight, self.weight_scale)
        y = _matmul(x, self.widened(self.weight, x.dtype))
        scale = self.weight_scale.reshape(-1) if self.weight_scale.numel() > 1 \
            else self.weight_scale
        return (y.float() * scale).to(x.dtype)


class Fp8Experts(_Widens, UsesKernels, nn.Module):
    """``SwiGLUExperts`` from FP8 values: ``w13`` [E, 2F, H] with ``w13_scale`` [E, 2] (the w1
    and w3 scale of each expert) and ``w2`` [E, H, F] with ``w2_scale`` [E]."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, keep_fp8: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        dtype = FP8_DTYPE if keep_fp8 else torch.bfloat16
        self.num_experts, self.ffn = num_experts, ffn
        self.register_buffer("w13", torch.empty(num_experts, 2 * ffn, hidden, dtype=dtype,
                                                device=device))
        self.register_buffer("w2", torch.empty(num_experts, hidden, ffn, dtype=dtype,
                                               device=device))
        self.register_buffer("w13_scale", torch.ones(num_experts, 2, device=device))
        self.register_buffer("w2_scale", torch.ones(num_experts, device=device))
        self.parallel = None  # an expert-parallel dispatcher, as on SwiGLUExperts
        self.lora: nn.Module | None = None  # low-rank adapters (skymoe.model.lora)

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel(self, x_TH, expert_ids_TK, weights_TK, keep_TK)
        return dispatch_sorted(x_TH, expert_ids_TK, weights_TK, self.num_experts,
                               self.sorted_ffn, keep_TK, self.kernels)

    def sorted_ffn(self, x_SH: torch.Tensor, counts: list[int], first: int = 0) -> torch.Tensor:
        """The FFN of rows sorted by expert for experts ``first, first + 1, ...``."""
        last = first + len(counts)
        if (self.lora is None and not _needs_input_grad(x_SH)
                and _use_scaled_mm(x_SH, self.w13) and _use_scaled_mm(x_SH, self.w2)):
            return self._ffn_scaled_mm(x_SH, counts, first)
        ffn = self.w13.shape[1] // 2  # this rank's share under expert tensor parallelism
        if _trains_through(x_SH, self.w13):
            h = _frozen_matmul(x_SH, self.w13[first:last],
                               self.w13_scale[first:last].repeat_interleave(ffn, 1)[..., None],
                               counts)
        else:
            h = self._scaled(_matmul(x_SH, self.widened(self.w13[first:last], x_SH.dtype),
                                     counts),
                             self.w13_scale, counts, first, halves=2)
        if self.lora is not None:
            h = h + self.lora.delta13(x_SH, counts, first).to(h.dtype)
        a = self.kernels.swiglu(h, consume_input=True)
        if _trains_through(a, self.w2):
            y = _frozen_matmul(a, self.w2[first:last], self.w2_scale[first:last, None, None],
                               counts)
        else:
            y = self._scaled(_matmul(a, self.widened(self.w2[first:last], a.dtype), counts),
                             self.w2_scale, counts, first, halves=1)
        if self.lora is not None:
            y = y + self.lora.delta2(a, counts, first).to(y.dtype)
        return y

    @staticmethod
    def _scaled(out_SO: torch.Tensor, scale: torch.Tensor, counts: list[int], first: int,
                halves: int) -> torch.Tensor:
        """Rows sorted by expert times their expert's scale (``halves`` scales per expert,
        each for an equal part of the row), in fp32, back in the rows' dtype."""
        expert_S = first + torch.repeat_interleave(
            torch.arange(len(counts), device=out_SO.device),
            torch.tensor(counts, device=out_SO.device))
        rows = out_SO.float().view(out_SO.shape[0], halves, -1)
        # Scaled as [S, halves, O / halves] by [S, halves, 1]: no [S, O] copy of the scale.
        return (rows * scale.view(-1, halves)[expert_S, :, None]).view_as(out_SO).to(
            out_SO.dtype)

    def _ffn_scaled_mm(self, x_SH: torch.Tensor, counts: list[int], first: int) -> torch.Tensor:
        """One FP8 GEMM per projection per non-empty expert."""
        outs, start = [], 0
        f = self.w13.shape[1] // 2
        for i, n in enumerate(counts):
            e = first + i
            if n == 0:
                continue
            rows = x_SH[start:start + n]
            start += n
            gate = _fp8_matmul(rows, self.w13[e, :f], self.w13_scale[e, 0])
            up = _fp8_matmul(rows, self.w13[e, f:], self.w13_scale[e, 1])
            outs.append(_fp8_matmul(F.silu(gate) * up, self.w2[e], self.w2_scale[e]))
        return torch.cat(outs) if outs else x_SH.new_zeros(0, x_SH.shape[-1])


def quantize_lm_head(model: SkyworkForCausalLM) -> None:
    """Replace the LM head by an FP8 linear layer, for inference: e4m3 values with one scale
    per vocabulary row (``amax(|row|) / 448``), one byte per weight, so a decode step reads
    8-bit weights throughout (llama.cpp's Q8_0 quantizes its output matrix too). Not part of
    the FP8 checkpoint convention, which keeps the head in bf16: a model whose head was
    quantized this way is for inference, not for saving. A tied embedding stays as it is."""
    head = model.lm_head
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"the LM head is a {type(head).__name__}, not a plain linear layer "
                          "(quantized already, or sharded): quantize it once, right after "
                          "loading the model")
    w = head.weight.detach()
    fp8 = Fp8Linear(w.shape[0], w.shape[1], per_channel=True, keep_fp8=True, device=w.device)
    fp8.weight = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    for start in range(0, w.shape[0], 4096):  # 4096 rows at a time: a bounded fp32 copy
        rows = slice(start, start + 4096)
        part = w[rows].float()
        scale = (part.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        fp8.weight[rows] = (part / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        fp8.weight_scale[rows] = scale
    model.lm_head = fp8


def use_fp8_modules(model: SkyworkForCausalLM, per_channel: set[str] = frozenset(),
                    keep_fp8: bool = False) -> SkyworkForCausalLM:
    """Replace every attention projection, dense MLP projection and expert block with its FP8
    module (empty; load the checkpoint afterwards). ``per_channel`` names the linear layers
    (``model.layers.0.self_attn.q_proj``) whose checkpoint scales are per output channel;
    ``keep_fp8`` (see ``keeps_fp8_values``) stores one byte per value."""
    device = model.device

    def fp8_version(name: str, parent: nn.Module, child: nn.Module) -> nn.Module | None:
        attr = name.rpartition(".")[2]
        if ((isinstance(parent, Attention) and attr in _LINEARS)
                or (isinstance(parent, DenseMLP) and attr in _MLP)):
            return Fp8Linear(child.out_features, child.in_features, name in per_channel,
                             keep_fp8, device)
        if type(child) is SwiGLUExperts:
            return Fp8Experts(child.num_experts, child.w13.shape[2], child.ffn, keep_fp8, device)
        return None

    replace_modules(model, fp8_version)
    return model
