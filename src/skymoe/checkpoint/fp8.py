"""The FP8 checkpoint format (Skywork-MoE-Base-FP8 / vLLM ``"fp8"``) and its variants.

- Quantized tensors: attention projections (q/k/v/o), expert matrices (w1/w2/w3, one scale per
  expert per matrix) and dense MLP projections, stored as ``float8_e4m3fn`` with an fp32
  ``<name>_scale`` (``...weight_scale``) of shape ``[]`` or ``[1]`` (per tensor) or ``[out, 1]``
  (per output channel); ``w = q.float() * weight_scale``.
- Block-scaled variant: ``...weight_scale_inv`` of shape ``[ceil(out/b0), ceil(in/b1)]`` with
  ``quantization_config.weight_block_size = [b0, b1]``; also multiplied.
- Static activation scales (``input_scale``, older ``act_scale``) belong to FP8 matmuls; they
  carry no weight information.
- Router, embeddings, LM head and norms are never quantized.
"""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..model.fp8 import FP8_DTYPE, FP8_MAX  # the e4m3 values the FP8 modules hold
QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic"}
# How load_model holds FP8 weights (see skymoe.checkpoint.hf.load_model).
FP8_MODES = ("auto", "keep", "dequantize")

_QUANTIZABLE = re.compile(r"(\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                          r"|\.experts\.\d+\.w[123])\.weight$")
_SCALE = re.compile(r"\.(weight_scale|weight_scale_inv|input_scale|act_scale)$")


def is_quantizable(name: str) -> bool:
    """Whether HF tensor ``name`` is stored in FP8 by the convention (attention, expert and MLP
    projections; never the router, embeddings, LM head or norms)."""
    return bool(_QUANTIZABLE.search(name))


def is_scale(name: str) -> bool:
    """Scale tensors that accompany FP8 weights (weight or activation scales)."""
    return bool(_SCALE.search(name))


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8: ``s = amax(|w|) / 448``, ``q = clamp(w / s, +-448)`` in e4m3; returns
    (q, s) with ``s`` an fp32 scalar tensor (1.0 for an all-zero tensor)."""
    w32 = w.float()
    amax = float(w32.abs().max()) if w32.numel() else 0.0
    scale = torch.tensor(amax / FP8_MAX if amax > 0 else 1.0, dtype=torch.float32)
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(name: str, q: torch.Tensor, scale: torch.Tensor,
               block_size: list[int] | None = None) -> torch.Tensor:
    """fp32 weight of FP8 tensor ``name`` from its scale: per tensor (``[]``/``[1]``), per
    output channel (``[out, 1]``) or, with ``block_size``, one scale per block."""
    w = q.float()
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    out_rows = w.shape[0]
    if block_size is None and s.shape in ((out_rows, 1), (out_rows,)):
        return w * s.reshape(out_rows, 1)
    if block_size is not None and w.ndim == 2:
        b0, b1 = block_size
        want = (-(-w.shape[0] // b0), -(-w.shape[1] // b1))
        if tuple(s.shape) == want:
            full = s.repeat_interleave(b0, 0)[:w.shape[0]].repeat_interleave(b1, 1)[:, :w.shape[1]]
            return w * full
        raise CheckpointError(f"'{name}': block scale has shape {list(s.shape)}, expected "
                              f"{list(want)} for blocks {block_size} of a {list(w.shape)} weight")
    raise CheckpointError(f"'{name}': scale of shape {list(s.shape)} fits neither a per-tensor "
                          f"([] or [1]) nor a per-channel ([{out_rows}, 1]) scale; block-scaled "
                          "weights need quantization_config.weight_block_size in config.json")


def block_size_of(quantization_config: object) -> list[int] | None:
    """``weight_block_size`` of a config.json ``quantization_config`` (None if absent)."""
    if not isinstance(quantization_config, dict):
        return None
    block = quantization_config.get("weight_block_size")
    if block is None:
        return None
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size = {block!r}: expected two "
                              "positive integers")
    return block
