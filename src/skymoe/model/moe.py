"""Skywork-MoE block: fp32 router with gating logit normalization, top-k, SwiGLU experts.

The routing math lives in pure functions (easy to test against hand computations); the module
only holds parameters. Expert weights are stored stacked, ``w13`` [E, 2F, H] (gate projection
``w1`` in rows ``:F``, up projection ``w3`` in rows ``F:``) and ``w2`` [E, H, F]; checkpoints
keep the per-expert HF names (see ``skymoe.checkpoint.names``).

Two expert implementations compute the same function from the same parameters:
``experts_loop`` (one masked gather per expert, the readable reference) and ``experts_grouped``
(assignments sorted by expert, one grouped matmul per projection).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6


class Routing(NamedTuple):
    """Routing decision for T tokens: fp32 probabilities and the chosen top-k."""

    probs_TE: torch.Tensor       # softmax over all experts (fp32)
    weights_TK: torch.Tensor     # renormalized top-k weights (fp32, rows sum to 1)
    expert_ids_TK: torch.Tensor  # chosen experts (int64)


def gating_logit_norm(logits_TE: torch.Tensor, scale: float, eps: float = NORM_EPS) -> torch.Tensor:
    """Skywork's gating logit normalization: ``scale * (z - mean(z)) / std(z)`` per token.

    ``std`` is the unbiased standard deviation over the E logits (as in the released code),
    guarded below by ``eps`` so a constant logit vector does not divide by zero.
    """
    std, mean = torch.std_mean(logits_TE, dim=-1, keepdim=True, correction=1)
    return (logits_TE - mean) * (scale / std.clamp_min(eps))


def route(logits_TE: torch.Tensor, top_k: int) -> Routing:
    """Softmax in fp32, top-k, and renormalization of the k weights to sum to one."""
    probs = torch.softmax(logits_TE.float(), dim=-1)
    top_w, top_ids = torch.topk(probs, top_k, dim=-1)
    return Routing(probs, top_w / top_w.sum(dim=-1, keepdim=True), top_ids)


def _swiglu(h_S2F: torch.Tensor) -> torch.Tensor:
    gate, up = h_S2F.chunk(2, dim=-1)
    return F.silu(gate) * up


def experts_loop(x_TH: torch.Tensor, w13_EFH: torch.Tensor, w2_EHF: torch.Tensor,
                 expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run the SwiGLU FFN, scatter-add back."""
    out_TH = torch.zeros_like(x_TH)
    for e in range(w13_EFH.shape[0]):
        token_idx, slot = torch.where(expert_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        y = F.linear(_swiglu(F.linear(x_TH[token_idx], w13_EFH[e])), w2_EHF[e])
        out_TH.index_add_(0, token_idx, (y * weights_TK[token_idx, slot, None]).to(x_TH.dtype))
    return out_TH


# Below this many rows per expert on average (decode, small batches) a loop over the non-empty
# groups beats the grouped kernel, which pays for every group, empty or not.
GROUPED_MM_MIN_ROWS_PER_EXPERT = 16


def _grouped_mm_kernel(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """The grouped GEMM with a working autograd on ``device``, or None.

    ``F.grouped_mm`` (torch >= 2.10) runs bf16 on CPU and CUDA sm_80+. ``torch._grouped_mm``
    is used only on CUDA: its CPU backward fails (torch 2.9-2.13).
    """
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return None
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm
    return None


def _use_grouped_mm(x: torch.Tensor, num_groups: int) -> bool:
    return (x.dtype == torch.bfloat16 and x.shape[0] >= GROUPED_MM_MIN_ROWS_PER_EXPERT * num_groups
            and _grouped_mm_kernel(x.device) is not None)


def grouped_linear(x_SH: torch.Tensor, w_EOH: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of ``x_SH`` sorted by expert (``counts[e]`` rows for expert e) times ``w_EOH[e].T``."""
    if _use_grouped_mm(x_SH, w_EOH.shape[0]):
        offsets = torch.tensor(counts, device=x_SH.device).cumsum(0).to(torch.int32)
        kernel = _grouped_mm_kernel(x_SH.device)
        return kernel(x_SH.contiguous(), w_EOH.transpose(-2, -1), offs=offsets)
    chunks = x_SH.split(counts)
    outs = [F.linear(chunk, w_EOH[e]) for e, chunk in enumerate(chunks) if counts[e]]
    if not outs:
        return x_SH.new_zeros(0, w_EOH.shape[1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


SortedFFN = Callable[[torch.Tensor, list[int]], torch.Tensor]


def dispatch_sorted(x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                    num_experts: int, ffn: SortedFFN) -> torch.Tensor:
    """Sort the T*K assignments by expert, run ``ffn(x_sorted_SH, counts)`` on the grouped
    rows, then weight, unsort and sum over K (in fp32, cast back to the input dtype)."""
    t, k = expert_ids_TK.shape
    flat_ids_S = expert_ids_TK.reshape(-1)
    order_S = torch.argsort(flat_ids_S, stable=True)
    counts = torch.bincount(flat_ids_S, minlength=num_experts).tolist()
    y_SH = ffn(x_TH[order_S // k], counts) * weights_TK.reshape(-1)[order_S, None]
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return y_SH[inverse_S].view(t, k, -1).sum(dim=1).to(x_TH.dtype)


def experts_grouped(x_TH: torch.Tensor, w13_EFH: torch.Tensor, w2_EHF: torch.Tensor,
                    expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Fast path: assignments sorted by expert, one grouped matmul per projection."""
    def ffn(x_SH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return grouped_linear(_swiglu(grouped_linear(x_SH, w13_EFH, counts)), w2_EHF, counts)

    return dispatch_sorted(x_TH, expert_ids_TK, weights_TK, w13_EFH.shape[0], ffn)


EXPERT_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "loop": experts_loop,
    "grouped": experts_grouped,
}


# The grouped path is the default on every device: it beat the loop in benchmarks/bench_model.py
# on CPU (one matmul per expert group instead of a masked gather per expert), and on CUDA it
# maps to torch's grouped GEMM. The loop stays available as the reference.
DEFAULT_EXPERT_IMPL = "grouped"


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts with stacked weights ``w13`` [E, 2F, H] and ``w2`` [E, H, F].

    ``impl`` selects the computation (``"grouped"`` or the reference ``"loop"``); inference
    transforms may replace the whole module (see ``skymoe.infer.cpu_kernels``).
    """

    def __init__(self, num_experts: int, hidden: int, ffn: int,
                 impl: str = DEFAULT_EXPERT_IMPL) -> None:
        super().__init__()
        self.num_experts, self.ffn, self.impl = num_experts, ffn, impl
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        return EXPERT_IMPLS[self.impl](x_TH, self.w13, self.w2, expert_ids_TK, weights_TK)


class MoEBlock(nn.Module):
    """Router + experts, exactly as Skywork-MoE's block (SYSTEM.md section 2).

    With ``use_logits_norm=False``, ``two_layer_gate=False`` and ``mul_topk=False`` this is
    Mixtral's sparse MoE block.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *,
                 use_logits_norm: bool, norm_scale: float, two_layer_gate: bool,
                 mul_topk: bool) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.use_logits_norm, self.norm_scale, self.mul_topk = use_logits_norm, norm_scale, mul_topk
        if two_layer_gate:
            # Names gate.0.weight / gate.2.weight match the Sequential of the reference code.
            self.gate: nn.Module = nn.Sequential(nn.Linear(hidden, 8 * num_experts, bias=False),
                                                 nn.Tanh(),
                                                 nn.Linear(8 * num_experts, num_experts, bias=False))
        else:
            self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = SwiGLUExperts(num_experts, hidden, ffn)

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Gate logits in fp32 (the router never runs in low precision)."""
        x = x_TH.float()
        if isinstance(self.gate, nn.Sequential):
            return F.linear(torch.tanh(F.linear(x, self.gate[0].weight.float())),
                            self.gate[2].weight.float())
        return F.linear(x, self.gate.weight.float())

    def routing(self, x_TH: torch.Tensor) -> Routing:
        logits = self.router_logits(x_TH)
        if self.use_logits_norm:
            logits = gating_logit_norm(logits, self.norm_scale)
        return route(logits, self.top_k)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        shape = x_BTH.shape
        x_TH = x_BTH.reshape(-1, shape[-1])
        r = self.routing(x_TH)
        expert_in = x_TH * self.top_k if self.mul_topk else x_TH
        return self.experts(expert_in, r.expert_ids_TK, r.weights_TK).view(shape)
