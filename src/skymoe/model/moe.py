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

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import PYTORCH_KERNELS, Kernels, UsesKernels, fused
from . import balance

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


def route(logits_TE: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None) -> Routing:
    """Softmax in fp32, top-k, and renormalization of the k weights to sum to one.

    ``bias_E`` (auxiliary-loss-free balancing) is added to the probabilities for the choice of
    the k experts only: the weights are the chosen experts' unbiased probabilities."""
    probs = torch.softmax(logits_TE.float(), dim=-1)
    if bias_E is None:
        top_w, top_ids = torch.topk(probs, top_k, dim=-1)
    else:
        top_ids = torch.topk(probs + bias_E.float(), top_k, dim=-1).indices
        top_w = probs.gather(1, top_ids)
    return Routing(probs, top_w / top_w.sum(dim=-1, keepdim=True), top_ids)


def experts_loop(x_TH: torch.Tensor, w13_EFH: torch.Tensor, w2_EHF: torch.Tensor,
                 expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None = None,
                 kernels: Kernels = PYTORCH_KERNELS) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run the SwiGLU FFN, scatter-add back.
    Assignments where ``keep_TK`` is False (dropped by capacity) are skipped."""
    out_TH = torch.zeros_like(x_TH)
    for e in range(w13_EFH.shape[0]):
        chosen = expert_ids_TK == e
        token_idx, slot = torch.where(chosen if keep_TK is None else chosen & keep_TK)
        if token_idx.numel() == 0:
            continue
        y = F.linear(kernels.swiglu(F.linear(x_TH[token_idx], w13_EFH[e])), w2_EHF[e])
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


def _use_grouped_mm(x: torch.Tensor, w_EOH: torch.Tensor) -> bool:
    # The kernel needs 16-byte aligned rows: both matrix widths a multiple of 8 bf16 values.
    return (x.dtype == torch.bfloat16
            and x.shape[0] >= GROUPED_MM_MIN_ROWS_PER_EXPERT * w_EOH.shape[0]
            and w_EOH.shape[1] % 8 == 0 and w_EOH.shape[2] % 8 == 0
            and _grouped_mm_kernel(x.device) is not None)


def grouped_linear(x_SH: torch.Tensor, w_EOH: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of ``x_SH`` sorted by expert (``counts[e]`` rows for expert e) times ``w_EOH[e].T``."""
    if torch.is_autocast_enabled(x_SH.device.type):
        # Autocast does not cover grouped_mm: cast like it casts F.linear (fp32 master weights).
        dtype = torch.get_autocast_dtype(x_SH.device.type)
        x_SH, w_EOH = x_SH.to(dtype), w_EOH.to(dtype)
    if _use_grouped_mm(x_SH, w_EOH):
        offsets = torch.tensor(counts, device=x_SH.device).cumsum(0).to(torch.int32)
        kernel = _grouped_mm_kernel(x_SH.device)
        return kernel(x_SH.contiguous(), w_EOH.transpose(-2, -1), offs=offsets)
    chunks = x_SH.split(counts)
    # unbind, not w_EOH[e]: the backward of E index ops writes E full-size zero gradients,
    # unbind's backward stacks the per-expert gradients once.
    weights = w_EOH.unbind(0)
    outs = [F.linear(chunk, weights[e]) for e, chunk in enumerate(chunks) if counts[e]]
    if not outs:
        return x_SH.new_zeros(0, w_EOH.shape[1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


SortedFFN = Callable[[torch.Tensor, list[int]], torch.Tensor]
# (experts module, x_TH, expert_ids_TK, weights_TK, keep_TK) -> y_TH, e.g. an all-to-all
ExpertDispatcher = Callable[..., torch.Tensor]


def dispatch_sorted(x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                    num_experts: int, ffn: SortedFFN, keep_TK: torch.Tensor | None = None,
                    kernels: Kernels = PYTORCH_KERNELS) -> torch.Tensor:
    """Sort the T*K assignments by expert, run ``ffn(x_sorted_SH, counts)`` on the grouped
    rows, then weight, unsort and sum over K (in fp32, cast back to the input dtype).

    Dropped assignments (``keep_TK`` False) sort behind every expert's rows as a pseudo-expert
    ``num_experts`` whose output is zero, so they cost no expert compute. ``kernels`` may do
    the gather and the weighted sum natively (one pass each way).
    """
    t, k = expert_ids_TK.shape
    flat_ids_S = expert_ids_TK.reshape(-1)
    if keep_TK is not None:
        flat_ids_S = flat_ids_S.masked_fill(~keep_TK.reshape(-1), num_experts)
    order_S = torch.argsort(flat_ids_S, stable=True)
    counts = torch.bincount(flat_ids_S, minlength=num_experts + 1).tolist()
    kept = t * k - counts[num_experts]
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    native = kernels.native_for(x_TH) if x_TH.dim() == 2 else None
    if native is not None:
        pos_TK = inverse_S.view(t, k)
        y_SH = ffn(fused.gather_rows(native, x_TH, order_S[:kept] // k, pos_TK),
                   counts[:num_experts])
        return fused.combine_rows(native, y_SH, pos_TK, weights_TK, x_TH.dtype)
    y_SH = ffn(x_TH[order_S[:kept] // k], counts[:num_experts])
    if kept < t * k:
        y_SH = torch.cat((y_SH, y_SH.new_zeros(t * k - kept, y_SH.shape[-1])))
    y_SH = y_SH * weights_TK.reshape(-1)[order_S, None]
    return y_SH[inverse_S].view(t, k, -1).sum(dim=1).to(x_TH.dtype)


def sorted_swiglu(x_SH: torch.Tensor, w13_EFH: torch.Tensor, w2_EHF: torch.Tensor,
                  counts: list[int], kernels: Kernels = PYTORCH_KERNELS,
                  lora: nn.Module | None = None, first: int = 0) -> torch.Tensor:
    """The SwiGLU FFN of rows sorted by expert (``counts[e]`` rows for expert e), plus the
    low-rank adapters' part when ``lora`` (``skymoe.model.lora.ExpertLoRA``, whose experts
    ``first, first + 1, ...`` these are) is given."""
    h_S2F = grouped_linear(x_SH, w13_EFH, counts)  # fresh and used only here: consumable
    if lora is not None:
        h_S2F = h_S2F + lora.delta13(x_SH, counts, first)
    a_SF = kernels.swiglu(h_S2F, consume_input=True)
    y_SH = grouped_linear(a_SF, w2_EHF, counts)
    return y_SH + lora.delta2(a_SF, counts, first) if lora is not None else y_SH


def experts_grouped(x_TH: torch.Tensor, w13_EFH: torch.Tensor, w2_EHF: torch.Tensor,
                    expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                    keep_TK: torch.Tensor | None = None,
                    kernels: Kernels = PYTORCH_KERNELS) -> torch.Tensor:
    """Fast path: assignments sorted by expert, one grouped matmul per projection."""
    return dispatch_sorted(
        x_TH, expert_ids_TK, weights_TK, w13_EFH.shape[0],
        lambda x, counts: sorted_swiglu(x, w13_EFH, w2_EHF, counts, kernels), keep_TK, kernels)


EXPERT_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "loop": experts_loop,
    "grouped": experts_grouped,
}


# The grouped path is the default on every device: it beat the loop in benchmarks/bench_model.py
# on CPU (one matmul per expert group instead of a masked gather per expert), and on CUDA it
# maps to torch's grouped GEMM. The loop stays available as the reference.
DEFAULT_EXPERT_IMPL = "grouped"


class SwiGLUExperts(UsesKernels, nn.Module):
    """E SwiGLU experts with stacked weights ``w13`` [E, 2F, H] and ``w2`` [E, H, F].

    ``impl`` selects the computation (``"grouped"`` or the reference ``"loop"``), ``kernels``
    the backend of its SwiGLU and row gather/combine (``SkyworkForCausalLM.use_kernels``);
    inference preparation may replace the whole module (see ``skymoe.infer.prepare``). Expert
    parallelism attaches a dispatcher as ``parallel`` (see ``skymoe.parallel.experts``), which
    then routes tokens across ranks and calls ``sorted_ffn`` on this rank's experts.
    """

    def __init__(self, num_experts: int, hidden: int, ffn: int,
                 impl: str = DEFAULT_EXPERT_IMPL) -> None:
        super().__init__()
        self.num_experts, self.ffn, self.impl = num_experts, ffn, impl
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.parallel: ExpertDispatcher | None = None
        self.lora: nn.Module | None = None  # low-rank adapters (skymoe.model.lora)

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel(self, x_TH, expert_ids_TK, weights_TK, keep_TK)
        if self.lora is not None and self.impl != "loop":
            return dispatch_sorted(x_TH, expert_ids_TK, weights_TK, self.num_experts,
                                   self.sorted_ffn, keep_TK, self.kernels)
        w13, w2 = self.w13, self.w2
        if self.lora is not None:  # the reference loop: on the merged weights
            d13, d2 = self.lora.delta_weights()
            w13, w2 = (w13 + d13).to(w13.dtype), (w2 + d2).to(w2.dtype)
        return EXPERT_IMPLS[self.impl](x_TH, w13, w2, expert_ids_TK, weights_TK, keep_TK,
                                       kernels=self.kernels)

    def sorted_ffn(self, x_SH: torch.Tensor, counts: list[int], first: int = 0) -> torch.Tensor:
        """The FFN of rows sorted by expert for this module's experts ``first, first + 1, ...``
        (``counts[i]`` rows each)."""
        last = first + len(counts)
        return sorted_swiglu(x_SH, self.w13[first:last], self.w2[first:last], counts,
                             self.kernels, self.lora, first)


@dataclass
class MoETrainingOptions:
    """How MoE blocks route while training (inference is always dropless, without aux loss).

    ``routing_group_size`` is the number of sequences that share a routing decision: capacity
    and the balance loss are computed per group. A fixed group (default: each sequence) makes
    training independent of how a batch is split into micro-batches; 0 means "the whole
    micro-batch".
    """

    capacity_factor: float = 1.0   # <= 0: dropless
    drop_policy: str = "probability"
    aux_loss: str = "skywork"
    z_loss_coef: float = 0.0
    routing_group_size: int = 1

    def __post_init__(self) -> None:
        if self.drop_policy not in balance.DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {balance.DROP_POLICIES}, "
                             f"not {self.drop_policy!r}")
        if self.aux_loss not in balance.AUX_LOSS_TYPES:
            raise ValueError(f"aux_loss must be one of {balance.AUX_LOSS_TYPES}, "
                             f"not {self.aux_loss!r}")
        if self.routing_group_size < 0:
            raise ValueError("routing_group_size must be >= 0 (0: the whole micro-batch)")


@dataclass
class MoEStats:
    """The one schema of an MoE layer's training statistics: detached sums over the tokens of
    one or more forwards (divide by ``tokens`` for means). ``load[e]`` counts the assignments
    routed to expert e before capacity; ``dropped`` those capacity removed."""

    tokens: torch.Tensor
    dropped: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    load: torch.Tensor
    max1_max2: torch.Tensor
    max2_max3: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device | str = "cpu") -> "MoEStats":
        """Zero sums (for layers a process does not hold, e.g. on other pipeline stages, so
        sums over processes line up)."""
        return cls(*(torch.zeros((), device=device) for _ in range(4)),
                   torch.zeros(num_experts, device=device),
                   torch.zeros((), device=device), torch.zeros((), device=device))

    def tensors(self) -> list[torch.Tensor]:
        """The sums in one fixed order (every rank reduces them in the same order)."""
        return [getattr(self, f.name) for f in fields(self)]

    def add_(self, other: "MoEStats") -> "MoEStats":
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine += theirs.to(mine.device)
        return self

    def clone(self) -> "MoEStats":
        return MoEStats(*(t.detach().clone() for t in self.tensors()))


def accumulate_stats(into: dict[int, MoEStats], stats: dict[int, MoEStats]) -> None:
    """Add each layer's ``stats`` to its sum in ``into`` (a copy starts a layer's sum)."""
    for layer, layer_stats in stats.items():
        if layer in into:
            into[layer].add_(layer_stats)
        else:
            into[layer] = layer_stats.clone()


@dataclass(frozen=True)
class MoEBalance:
    """What a training forward needs to balance the MoE layers: the routing options and each
    MoE layer's balance-loss coefficient by global layer index (from the adaptive
    controller). Passed to the model's forward; nothing is kept on the modules."""

    options: MoETrainingOptions
    coefs: dict[int, float]
    # The step's expert loads by layer, counted over every rank and micro-batch (the
    # global-batch balance loss, ``options.aux_loss == "global"``).
    global_loads: Mapping[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_layers(cls, options: MoETrainingOptions, moe_layers: Sequence[int],
                   coefs: Sequence[float]) -> "MoEBalance":
        """Coefficients given in MoE-layer order (``moe_layers``: their global indices)."""
        if len(coefs) != len(moe_layers):
            raise ValueError(f"got {len(coefs)} coefficients for {len(moe_layers)} MoE layers")
        return cls(options, {i: float(c) for i, c in zip(moe_layers, coefs)})

    @property
    def needs_global_loads(self) -> bool:
        return self.options.aux_loss == "global"

    def with_global_loads(self, loads: Mapping[int, torch.Tensor]) -> "MoEBalance":
        return replace(self, global_loads=dict(loads))


class MoEOutput(NamedTuple):
    """What one training forward of an MoE block yields beside its hidden states: ``aux``,
    coefficient * balance loss + z-coefficient * z-loss (differentiable: add it to the loss),
    and the layer's detached statistics."""

    aux: torch.Tensor
    stats: MoEStats


class MoEBlock(nn.Module):
    """Router + experts, exactly as Skywork-MoE's block (docs/model.md, "MoE block").

    With ``use_logits_norm=False``, ``two_layer_gate=False`` and ``mul_topk=False`` this is
    Mixtral's sparse MoE block.

    ``forward(x)`` routes every assignment (inference) and returns ``(y, None)``. A training
    forward, ``forward(x, options, aux_coef)`` in training mode, drops assignments beyond
    capacity and returns ``(y, MoEOutput)``: the aux term and the statistics flow out of the
    call, so recomputation in backward (whose outputs are discarded) cannot rewrite them.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *,
                 use_logits_norm: bool, norm_scale: float, two_layer_gate: bool,
                 mul_topk: bool, expert_bias: bool = False) -> None:
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
        self.expert_bias: torch.Tensor | None
        self.register_buffer("expert_bias", None)
        if expert_bias:
            self.enable_expert_bias()

    def enable_expert_bias(self) -> None:
        """Give the block a zero routing bias (auxiliary-loss-free balancing) if it has none:
        an fp32 buffer [E], saved in checkpoints as ``block_sparse_moe.expert_bias``, set by
        the trainer (not by gradients) and used for the top-k choice in every forward."""
        if self.expert_bias is None:
            device = next(self.gate.parameters()).device
            self.expert_bias = torch.zeros(self.num_experts, dtype=torch.float32, device=device)

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Gate logits in fp32 (the router never runs in low precision), normalized when the
        block uses gating logit normalization: the values the softmax sees."""
        x = x_TH.float()
        # Autocast would run these matmuls in bf16 whatever their inputs' dtype.
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(self.gate, nn.Sequential):
                logits = F.linear(torch.tanh(F.linear(x, self.gate[0].weight.float())),
                                  self.gate[2].weight.float())
            else:
                logits = F.linear(x, self.gate.weight.float())
        return gating_logit_norm(logits, self.norm_scale) if self.use_logits_norm else logits

    def routing(self, x_TH: torch.Tensor) -> Routing:
        return route(self.router_logits(x_TH), self.top_k, self.expert_bias)

    def forward(self, x_BTH: torch.Tensor, options: MoETrainingOptions | None = None,
                aux_coef: float = 0.0, global_load_E: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEOutput | None]:
        shape = x_BTH.shape
        x_TH = x_BTH.reshape(-1, shape[-1])
        logits_TE = self.router_logits(x_TH)
        r = route(logits_TE, self.top_k, self.expert_bias)
        expert_in = x_TH * self.top_k if self.mul_topk else x_TH
        if options is None or not self.training:  # evaluation always routes dropless
            return self.experts(expert_in, r.expert_ids_TK, r.weights_TK).view(shape), None
        num_seqs = shape[0] if len(shape) == 3 else 1
        keep_TK, out = self._balance(logits_TE, r, num_seqs, options, aux_coef, global_load_E)
        y = self.experts(expert_in, r.expert_ids_TK, r.weights_TK, keep_TK).view(shape)
        return y, out

    def _balance(self, logits_TE: torch.Tensor, r: Routing, num_seqs: int,
                 opts: MoETrainingOptions, aux_coef: float, global_load_E: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, MoEOutput]:
        """Capacity, balance losses and statistics of one training forward: the keep mask
        (None: dropless) and the layer's output record."""
        t, k = r.expert_ids_TK.shape
        group_seqs = opts.routing_group_size or num_seqs
        num_groups = math.ceil(num_seqs / group_seqs)
        group_T = torch.arange(t, device=logits_TE.device) // (t // num_seqs * group_seqs)
        keep_TK = None
        tokens_G = torch.bincount(group_T, minlength=num_groups)
        capacities = [balance.expert_capacity(n, self.num_experts, k, opts.capacity_factor)
                      for n in tokens_G.tolist()]
        if capacities[0] is not None:
            keep_TK = balance.capacity_keep_mask(
                r.expert_ids_TK, r.probs_TE, group_T[:, None].expand(t, k), self.num_experts,
                torch.tensor(capacities, device=logits_TE.device), opts.drop_policy)
        aux = balance.aux_loss(r.probs_TE, r.expert_ids_TK, opts.aux_loss, group_T, num_groups,
                               global_load_E)
        z = balance.router_z_loss(logits_TE)
        with torch.no_grad():
            max12, max23 = (balance.gate_sharpness(r.probs_TE) if self.num_experts >= 3
                            else (torch.tensor(float("nan")),) * 2)
            stats = MoEStats(
                tokens=torch.tensor(float(t)),
                dropped=((t * k - keep_TK.sum()).float() if keep_TK is not None
                         else torch.zeros(())),
                aux_loss=aux.detach() * t, z_loss=z.detach() * t,
                load=torch.bincount(r.expert_ids_TK.reshape(-1),
                                    minlength=self.num_experts).float(),
                max1_max2=max12, max2_max3=max23)
        return keep_TK, MoEOutput(aux_coef * aux + opts.z_loss_coef * z, stats)
