"""Deployment planner for tensor-parallel serving: does the model fit on N GPUs, how much KV
cache is left per rank, and what decode throughput the memory bandwidth allows.

Everything is computed from the model config (docs/inference.md, "Deployment planner";
non-uniform TP):

- attention heads split over ranks with the first ``heads % N`` ranks one extra head (KV heads
  likewise; each rank keeps the query heads of its KV heads);
- experts (and dense MLPs) split evenly along the intermediate dimension;
- the vocabulary padded to a multiple of 24 (divisible by 1, 2, 3, 4, 6, 8, 12) and split;
- router, norms, embedding and LM head in bf16; attention and expert projections in the
  weight dtype (fp8: one byte per value plus one fp32 scale per tensor);
- KV cache in ``kv_dtype``, sized by the rank holding the most KV heads.

Decode is memory-bound: a step streams the rank's weights (for MoE layers only the experts some
token of the batch routes to: ``1 - (1 - k/E)^batch`` of them on average) and the batch's KV
cache, plus two all-reduces of the batch's hidden states per layer over the GPU link.

Shard sizes and weight bytes come from ``skymoe.arithmetic`` under the serving layout: TP and
ETP over all GPUs (``serving_layout``), the vocabulary padded to 24.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arithmetic import RankShard, layer_shard, rank_shard, rank_weight_bytes
from ..config import SkyworkMoeConfig
from ..errors import ConfigError
from ..parallel.layout import ParallelLayout
from ..parallel.placement import VOCAB_MULTIPLE, padded_vocab

GIB = 2**30
BF16, FP32 = 2, 4
WEIGHT_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
KV_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class GpuSpec:
    """Memory, HBM bandwidth, link bandwidth and the fixed cost of one small all-reduce, and
    the memory kept back for the CUDA context, activations and workspace."""

    memory: int
    bandwidth: float              # bytes/s
    link_bandwidth: float         # bytes/s per direction between GPUs
    all_reduce_latency: float     # seconds per all-reduce, before bandwidth
    reserve: int = int(1.5 * GIB)


GPU_PRESETS: dict[str, GpuSpec] = {
    "4090": GpuSpec(24 * GIB, 1008e9, 25e9, 25e-6),     # PCIe 4.0 x16
    "a100": GpuSpec(80 * GIB, 2039e9, 300e9, 10e-6),    # NVLink 3
    "h100": GpuSpec(80 * GIB, 3350e9, 450e9, 8e-6),     # NVLink 4
    "h200": GpuSpec(141 * GIB, 4800e9, 450e9, 8e-6),
}


def head_split(config: SkyworkMoeConfig, ranks: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) per rank; 36 MHA heads over 8 ranks -> 5,5,5,5,4,4,4,4."""
    if ranks > config.num_key_value_heads:
        raise ConfigError(f"{ranks} GPUs exceed the {config.num_key_value_heads} KV heads; "
                          "tensor parallelism splits at head boundaries")
    layers = [layer_shard(config, 0, tp=ranks, tp_rank=r) for r in range(ranks)]
    return [a.q_heads for a in layers], [a.kv_heads for a in layers]


@dataclass
class RankPlan:
    rank: int
    q_heads: int
    kv_heads: int
    weight_bytes: int
    kv_bytes_per_token: int
    free_bytes: int         # for the KV cache (negative: does not fit)

    @property
    def kv_tokens(self) -> int:
        return max(self.free_bytes, 0) // self.kv_bytes_per_token


@dataclass
class DecodePoint:
    batch: int
    step_s: float
    tokens_per_s: float
    fits: bool              # the batch's KV cache fits in what is left


@dataclass
class ServePlan:
    config: SkyworkMoeConfig
    gpus: int
    gpu: GpuSpec
    weight_dtype: str
    kv_dtype: str
    context: int
    vocab: int
    ranks: list[RankPlan]
    decode: list[DecodePoint] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(r.free_bytes > 0 for r in self.ranks)

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache the deployment holds (limited by the fullest rank)."""
        return min(r.kv_tokens for r in self.ranks)


def serving_layout(gpus: int) -> ParallelLayout:
    """Tensor parallelism over ``gpus``, each expert cut along its intermediate size over
    all of them (ETP = TP, no expert parallelism)."""
    return ParallelLayout(tp=gpus, etp=gpus)


def _rank_shard(config: SkyworkMoeConfig, gpus: int, rank: int) -> RankShard:
    return rank_shard(config, serving_layout(gpus), rank, VOCAB_MULTIPLE)


def _rank_weight_bytes(config: SkyworkMoeConfig, gpus: int, rank: int, wbytes: int) -> int:
    """Attention and expert (and dense MLP) projections in the weight dtype, fp8 with an fp32
    scale per tensor; router, norms, embedding and LM head in bf16."""
    return rank_weight_bytes(_rank_shard(config, gpus, rank), wbytes, BF16,
                             FP32 if wbytes == 1 else 0)


def _all_reduce_s(nbytes: float, gpus: int, gpu: GpuSpec) -> float:
    """Ring all-reduce: a fixed cost plus 2 (n-1)/n of the data over the link."""
    if gpus == 1:
        return 0.0
    return gpu.all_reduce_latency + 2 * (gpus - 1) / gpus * nbytes / gpu.link_bandwidth


def decode_step_s(plan: ServePlan, batch: int) -> float:
    """Estimated seconds of one decode step for ``batch`` sequences of ``plan.context`` cached
    tokens on average (the slowest rank sets the pace)."""
    c, gpu = plan.config, plan.gpu
    wbytes = WEIGHT_BYTES[plan.weight_dtype]
    touched = 1.0 - (1.0 - c.num_experts_per_tok / max(c.num_experts, 1)) ** batch
    worst = 0.0
    for r in plan.ranks:
        expert_bytes = _rank_shard(c, plan.gpus, r.rank).expert * wbytes
        streamed = r.weight_bytes - expert_bytes * (1.0 - touched)
        kv_read = batch * plan.context * r.kv_bytes_per_token
        worst = max(worst, (streamed + kv_read) / gpu.bandwidth)
    comm = 2 * c.num_hidden_layers * _all_reduce_s(batch * c.hidden_size * BF16, plan.gpus, gpu)
    return worst + comm


def plan_serve(config: SkyworkMoeConfig, gpus: int, gpu: GpuSpec, weight_dtype: str = "fp8",
               kv_dtype: str = "bf16", context: int = 1024,
               batches: tuple[int, ...] = (1, 4, 16, 32, 64, 128)) -> ServePlan:
    """The per-rank memory plan and decode estimates for ``config`` on ``gpus`` GPUs."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if weight_dtype not in WEIGHT_BYTES:
        raise ConfigError(f"--dtype must be one of {sorted(WEIGHT_BYTES)}, not {weight_dtype!r}")
    if kv_dtype not in KV_BYTES:
        raise ConfigError(f"--kv-dtype must be one of {sorted(KV_BYTES)}, not {kv_dtype!r}")
    if context < 1:
        raise ConfigError(f"--context must be >= 1, got {context}")
    q_split, kv_split = head_split(config, gpus)
    vocab = padded_vocab(config.vocab_size)
    ranks = []
    for r in range(gpus):
        weights = _rank_weight_bytes(config, gpus, r, WEIGHT_BYTES[weight_dtype])
        kv_per_token = 2 * config.num_hidden_layers * kv_split[r] * config.head_size \
            * KV_BYTES[kv_dtype]
        ranks.append(RankPlan(r, q_split[r], kv_split[r], weights, kv_per_token,
                              gpu.memory - gpu.reserve - weights))
    plan = ServePlan(config, gpus, gpu, weight_dtype, kv_dtype, context, vocab, ranks)
    if plan.fits:
        for b in batches:
            step = decode_step_s(plan, b)
            plan.decode.append(DecodePoint(b, step, b / step, b * context <= plan.kv_tokens))
    return plan


def format_plan(plan: ServePlan) -> str:
    """A readable report of ``plan`` (what ``skymoe plan serve`` prints)."""
    c, gpu = plan.config, plan.gpu
    q = ",".join(str(r.q_heads) for r in plan.ranks)
    kv = ",".join(str(r.kv_heads) for r in plan.ranks)
    lines = [
        f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts "
        f"top-{c.num_experts_per_tok}, {c.num_attention_heads} heads / {c.num_key_value_heads} "
        f"KV heads, vocab {c.vocab_size} (padded to {plan.vocab})",
        f"deployment: {plan.gpus} GPU(s) x {gpu.memory / GIB:.1f} GiB, weights "
        f"{plan.weight_dtype}, KV cache {plan.kv_dtype}, {gpu.reserve / GIB:.1f} GiB per GPU "
        "kept for "
        "context/activations",
        f"head split: query {q}; KV {kv}",
        f"{'rank':>4} {'heads':>5} {'weights GiB':>11} {'free for KV GiB':>15} "
        f"{'KV tokens':>10}",
    ]
    for r in plan.ranks:
        lines.append(f"{r.rank:>4} {r.q_heads:>5} {r.weight_bytes / GIB:>11.2f} "
                     f"{r.free_bytes / GIB:>15.2f} {r.kv_tokens:>10,}")
    if not plan.fits:
        short = max(-r.free_bytes for r in plan.ranks)
        hint = "more GPUs or larger ones" + ("" if plan.weight_dtype == "fp8" else
                                              ", or fp8 weights (--dtype fp8)")
        lines.append(f"does not fit: the fullest rank is {short / GIB:.2f} GiB short; use {hint}")
        return "\n".join(lines)
    total_kv = sum(r.kv_bytes_per_token for r in plan.ranks)
    lines.append(f"fits: {plan.kv_tokens:,} tokens of KV cache ({total_kv / 1e6:.2f} MB per "
                 f"token over all ranks), e.g. {plan.kv_tokens // plan.context} sequences of "
                 f"{plan.context} tokens")
    lines.append(f"decode estimate (memory-bound, {gpu.bandwidth / 1e9:.0f} GB/s per GPU, "
                 f"{gpu.link_bandwidth / 1e9:.0f} GB/s links, {plan.context}-token contexts):")
    lines.append(f"{'batch':>6} {'step ms':>8} {'output tok/s':>13}")
    for p in plan.decode:
        note = "" if p.fits else "  (KV cache too small for this batch)"
        lines.append(f"{p.batch:>6} {p.step_s * 1e3:>8.1f} {p.tokens_per_s:>13,.0f}{note}")
    return "\n".join(lines)
