"""Mapping between HF checkpoint tensor names and the model's parameters.

Every parameter keeps its HF name except the stacked expert weights: HF's
``...block_sparse_moe.experts.{e}.w1.weight`` / ``w3`` / ``w2`` are slices of the model's
``...block_sparse_moe.experts.w13`` (w1 rows ``:F``, w3 rows ``F:``) and ``...experts.w2``.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

_EXPERT = re.compile(r"^(?P<prefix>.+\.block_sparse_moe\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_ignored(name: str) -> bool:
    """Checkpoint entries that carry no weights (precomputed rotary frequencies)."""
    return bool(_IGNORED.search(name))


_EXPERT_SCALE = re.compile(r"^(?P<prefix>.+\.block_sparse_moe\.experts)\.(?P<e>\d+)"
                           r"\.(?P<w>w[123])\.weight_scale$")


def resolve(name: str, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The parameter or buffer (or slice of one) that HF tensor ``name`` fills, or None if
    unknown. FP8 modules (``skymoe.model.fp8``) keep per-expert scales stacked in
    ``experts.w13_scale`` [E, 2] (w1, w3) and ``experts.w2_scale`` [E]."""
    s = _EXPERT_SCALE.match(name)
    if s is not None:
        prefix, e, which = s["prefix"], int(s["e"]), s["w"]
        stacked = params.get(prefix + (".w2_scale" if which == "w2" else ".w13_scale"))
        if stacked is None or e >= stacked.shape[0]:
            return None
        return stacked[e] if which == "w2" else stacked[e, 0 if which == "w1" else 1]
    m = _EXPERT.match(name)
    if m is None:
        return params.get(name)
    prefix, e, which = m["prefix"], int(m["e"]), m["w"]
    if which == "w2":
        stacked = params.get(prefix + ".w2")
        return stacked[e] if stacked is not None and e < stacked.shape[0] else None
    stacked = params.get(prefix + ".w13")
    if stacked is None or e >= stacked.shape[0]:
        return None
    ffn = stacked.shape[1] // 2
    return stacked[e, :ffn] if which == "w1" else stacked[e, ffn:]


def hf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """All weights of ``model`` under their HF names (views; nothing is copied), FP8 modules'
    values and scales included (values held widened are narrowed back to e4m3, exactly); LoRA
    adapters are not model weights and are left out."""
    seen: set[int] = set()
    buffers = dict(model.named_buffers())
    for name, p in [*model.named_parameters(remove_duplicate=False), *buffers.items()]:
        if id(p) in seen and name == "lm_head.weight":
            continue  # tied embeddings are stored once, as HF does
        if ".lora." in name:
            continue  # LoRA adapters are stored apart (skymoe.checkpoint.adapter)
        seen.add(id(p))
        data = p.detach()
        if name + "_scale" in buffers and data.dtype != torch.float8_e4m3fn:
            data = data.to(torch.float8_e4m3fn)  # e4m3 values kept in bf16: exact round trip
        if name.endswith((".experts.w13_scale", ".experts.w2_scale")):
            prefix, which = name.rsplit(".", 1)
            for e in range(data.shape[0]):
                if which == "w2_scale":
                    yield f"{prefix}.{e}.w2.weight_scale", data[e]
                else:
                    yield f"{prefix}.{e}.w1.weight_scale", data[e, 0]
                    yield f"{prefix}.{e}.w3.weight_scale", data[e, 1]
        elif name.endswith(".experts.w13"):
            prefix, ffn = name[: -len(".w13")], data.shape[1] // 2
            for e in range(data.shape[0]):
                yield f"{prefix}.{e}.w1.weight", data[e, :ffn]
                yield f"{prefix}.{e}.w3.weight", data[e, ffn:]
        elif name.endswith(".experts.w2"):
            prefix = name[: -len(".w2")]
            for e in range(data.shape[0]):
                yield f"{prefix}.{e}.w2.weight", data[e]
        else:
            yield name, data


def expected_names(model: nn.Module) -> list[str]:
    """HF names a complete checkpoint of ``model`` must contain."""
    return [name for name, _ in hf_tensors(model)]
