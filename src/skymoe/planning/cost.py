"""What one micro-batch costs on one pipeline rank, per piece of the model: the input the
pipeline planner (``skymoe.planning.search``) splits and schedules.

A ``CostProfile`` lists, per decoder layer (dense and MoE layers differ) and for the embedding
and the head (final norm + LM head + loss): forward, backward and recompute seconds, the bytes
autograd keeps for backward, and the static bytes of parameters, gradients and AdamW states.
Two ways to get one:

- ``skymoe.planning.measure.measure_profile``: time and count the real modules on this machine
  (small configs);
- ``analytical_profile`` (here): FLOPs at a device's sustained rate and byte formulas for the
  saved tensors, for configs too large to run here (the real Skywork-MoE on A800s); parameter
  counts, shard sizes and FLOPs come from ``skymoe.arithmetic``.

Both describe training as skymoe runs it: fp32 master weights under bf16 autocast (fp32
residual stream and norms, bf16 matmul inputs and outputs), AdamW with fp32 moments (ZeRO-1
shards the moments over data parallelism), MoE layers with capacity-factor-1.0 drops and the
balance loss on, and the pipeline stage forward entered once per micro-batch, each in its own
autocast region (``PipelineStageModel``). That last point matters for memory: autocast's bf16
copies of the weights are made per micro-batch and autograd keeps them until that
micro-batch's backward, so they count as per-micro-batch bytes, not static ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arithmetic import head_forward_flops, layer_forward_flops, rank_shard
from ..config import SkyworkMoeConfig
from ..errors import ConfigError
from ..parallel.layout import ParallelLayout

GIB = 2**30
FP32, BF16, INT64 = 4, 2, 8
# Static bytes per parameter: fp32 weight, fp32 gradient, two fp32 AdamW moments.
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8


def format_bytes(n: float) -> str:
    """``2.50 GiB``, ``12.00 MiB``, ``300 B``."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class CostProfile:
    """Costs of one micro-batch on one rank of a pipeline stage.

    Times are seconds per micro-batch, sizes bytes. ``layer_*`` tuples are indexed by global
    decoder layer. For each layer:

    - ``layer_forward`` / ``layer_backward``: its forward and backward;
    - ``layer_recompute``: the extra backward time when it is recomputed (its forward re-run);
    - ``layer_activation``: what autograd keeps for its backward when it is not recomputed;
    - ``layer_checkpoint``: what is kept when it is recomputed (its input only);
    - ``layer_static``: parameters + gradients + optimizer states on this rank.

    ``embed_*`` and ``head_*`` are the same for the token embedding (stage 0) and for the final
    norm + LM head + loss (last stage). ``head_activation`` includes the logits, which the
    schedule keeps as the stage output until the micro-batch's backward; ``head_static`` counts
    the LM head even when it is tied to the embedding (each end of a pipeline holds a copy).
    ``output_bytes`` is one micro-batch's hidden states: what a stage sends to the next and
    keeps until that micro-batch's backward; ``p2p_time`` the time to send it (or its gradient
    back). ``source`` says where the numbers come from.
    """

    layer_forward: tuple[float, ...]
    layer_backward: tuple[float, ...]
    layer_recompute: tuple[float, ...]
    layer_activation: tuple[int, ...]
    layer_checkpoint: tuple[int, ...]
    layer_static: tuple[int, ...]
    embed_forward: float
    embed_backward: float
    embed_activation: int
    embed_static: int
    head_forward: float
    head_backward: float
    head_activation: int
    head_static: int
    output_bytes: int
    p2p_time: float
    source: str

    def __post_init__(self) -> None:
        lists = ("layer_forward", "layer_backward", "layer_recompute", "layer_activation",
                 "layer_checkpoint", "layer_static")
        for name in lists:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        lengths = {len(getattr(self, name)) for name in lists}
        if len(lengths) != 1:
            raise ConfigError(f"cost profile: the per-layer lists {lists} must have one entry "
                              f"per decoder layer, got lengths {sorted(lengths)}")

    @property
    def num_layers(self) -> int:
        """Decoder layers of the profiled model."""
        return len(self.layer_forward)


# ------------------------------------------------------------------------------ analytical
@dataclass(frozen=True)
class DeviceSpec:
    """A training GPU: memory (and the part of it kept for the CUDA context, communication
    buffers and allocator slack), bf16 dense peak FLOP/s and the fraction of it sustained in
    training, HBM bandwidth (for the memory-bound embedding, norms and loss), and the
    bandwidth and latency of the point-to-point link between pipeline stages (stages sit on
    different nodes: the per-GPU network bandwidth)."""

    name: str
    memory: int
    peak_flops: float
    efficiency: float
    hbm_bandwidth: float
    p2p_bandwidth: float
    p2p_latency: float
    reserve: int = 2 * GIB

    @property
    def sustained_flops(self) -> float:
        """FLOP/s the matmuls of training reach on average."""
        return self.peak_flops * self.efficiency

    @property
    def usable_memory(self) -> int:
        """Bytes for weights, gradients, optimizer states and activations."""
        return self.memory - self.reserve


# Sustained efficiency: an assumed 40% of peak for the matmuls of MoE training (routing,
# dispatch, tensor-parallel and all-to-all traffic not overlapped are folded into it).
DEVICE_PRESETS: dict[str, DeviceSpec] = {
    # Skywork-MoE's training GPU: A100 compute with 400 GB/s NVLink; HDR InfiniBand 200 Gb/s.
    "a800": DeviceSpec("a800", 80 * GIB, 312e12, 0.4, 2039e9, 25e9, 10e-6),
    # H100 SXM: 989 TFLOP/s dense bf16; NDR InfiniBand 400 Gb/s per GPU.
    "h100": DeviceSpec("h100", 80 * GIB, 989e12, 0.4, 3350e9, 50e9, 10e-6),
}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def analytical_profile(config: SkyworkMoeConfig, seq_len: int, micro_batch_size: int,
                       device: DeviceSpec, tp: int = 1, ep: int = 1, dp: int = 1,
                       zero: bool = True) -> CostProfile:
    """Costs of one micro-batch of ``micro_batch_size`` x ``seq_len`` tokens on the fullest
    rank of a stage, from the config alone (bf16 autocast training; EDP: attention and dense
    MLPs split over ``tp``, experts over ``ep``, ``dp`` data-parallel replicas).

    With T = micro_batch_size * seq_len tokens, h hidden, F intermediate, d head size, a / a_kv
    query / KV heads of TP rank 0 (ceil(KV heads / tp) KV heads and their query groups: the
    most any rank holds), E experts, k = top-k; weight sizes from ``skymoe.arithmetic``:

    Time. Forward FLOPs per layer (``arithmetic.layer_forward_flops``, 2 per multiply-add, as
    ``flops_per_token``): attention projections 2 T h (2 a + 2 a_kv) d, causal scores and
    values 2 T a d seq_len, router 2 T x its size (h E; h 8E + 8E E with the two-layer gate),
    dense MLP 2 T 3 h F / tp, MoE experts 2 R 3 h F with R = T_m k rows, where
    T_m = T / tp tokens are dispatched per rank (EDP splits the TP group's replicated tokens)
    and no assignment is dropped (an upper bound). Backward = 2 x forward, recompute =
    forward, each at ``device.sustained_flops``. The embedding, final norm and loss are
    memory-bound (bytes moved / HBM bandwidth); the LM head is a matmul of 2 T h V / tp.

    Saved bytes per layer (what autograd keeps under bf16 autocast with PyTorch's ops, as on
    GPU; CPU's fused native kernels keep somewhat less):
    attention: 8 T h (fp32 input and normalized input) + 4 T (rms) + 6 T h (bf16 casts of the
    normalized input for q, k, v) + 2 T (2 a + 2 a_kv) d (q, k after rotary, v, attention
    output) + 4 T a (softmax log-sum-exp); FFN norm: 8 T h + 4 T; dense MLP: 4 T h (two
    input casts) + 8 T F / tp (gate, up, silu(gate), product); MoE: router 2 T h + 12 T E +
    20 T k + 22 T (input cast, bf16 logits and their normalization, fp32 probabilities and
    balance-loss terms, top-k ids and weights), experts R (8 + 2 h + 8 F) (sort index, gathered
    rows, the 2F-wide projection, silu and product) + T_m k (2 h + 20) (weighted outputs,
    order and weights); plus the bf16 weight copies autocast makes and autograd keeps
    (2 bytes per local matmul weight: attention / tp, router, dense MLP / tp or E / ep
    experts). Recomputed: the fp32 layer input, 4 T h.
    Head: 8 T h + 4 T (final norm) + 2 T h + 2 V h / tp (LM head input and weight casts) +
    4 T V / tp (bf16 logits kept by the schedule, bf16 loss gradient). Embedding: 8 T (ids).

    Static bytes per parameter: 4 (fp32 weight) + 4 (fp32 gradient) + 8 (AdamW moments) /
    the data-parallel group with ZeRO-1 (dense: dp; experts: dp * tp / ep ranks hold the same
    experts). Norms and the router are replicated over TP; embedding and LM head split by rows.

    P2P: the fp32 hidden states, 4 T h bytes, over ``device.p2p_bandwidth`` plus latency.
    """
    c = config
    if seq_len < 1 or micro_batch_size < 1:
        raise ConfigError(f"sequence length ({seq_len}) and micro-batch size "
                          f"({micro_batch_size}) must be >= 1")
    layout = ParallelLayout(dp=dp, tp=tp, ep=ep).validate(config=c)
    shard = rank_shard(c, layout, 0)  # TP / EP rank 0 holds the most (the first get extras)
    t_tok = micro_batch_size * seq_len
    h, f, e, k = c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok
    t_moe = _ceil_div(t_tok, tp)
    rows = t_moe * k
    sustained, hbm = device.sustained_flops, device.hbm_bandwidth

    def static(dense: int, expert: int = 0) -> int:
        dense_opt = ADAM_BYTES / (dp if zero else 1)
        expert_opt = ADAM_BYTES / (dp * tp // ep if zero else 1)
        return round(dense * (WEIGHT_BYTES + GRAD_BYTES + dense_opt)
                     + expert * (WEIGHT_BYTES + GRAD_BYTES + expert_opt))

    forward, activation, static_bytes = [], [], []
    for layer in shard.layers:
        a, a_kv = layer.q_heads, layer.kv_heads
        saved = (8 * t_tok * h + 4 * t_tok + 6 * t_tok * h + 2 * t_tok * (2 * a + 2 * a_kv)
                 * c.head_size + 4 * t_tok * a + 8 * t_tok * h + 4 * t_tok
                 + BF16 * layer.attention)
        if layer.moe:
            saved += (2 * t_tok * h + 12 * t_tok * e + 20 * t_tok * k + 22 * t_tok
                      + rows * (8 + 2 * h + 8 * f) + t_moe * k * (2 * h + 20)
                      + BF16 * (layer.router + layer.expert_total))
        else:
            saved += 4 * t_tok * h + 8 * t_tok * layer.ffn + BF16 * layer.mlp
        flops = layer_forward_flops(c, layer, t_tok, seq_len, rows if layer.moe else 0)
        forward.append(flops / sustained)
        activation.append(saved)
        static_bytes.append(static(layer.dense, layer.expert_total))
    n = c.num_hidden_layers
    hidden_bytes = FP32 * t_tok * h
    v_tp, head_w = shard.vocab_rows, shard.lm_head
    head_flops = head_forward_flops(shard, t_tok)
    # Norm: read x, write normalized; loss: read bf16 logits, write the bf16 gradient.
    head_fwd_bytes = 2 * hidden_bytes + 4 * t_tok * v_tp
    head_bwd_bytes = 4 * hidden_bytes + 4 * t_tok * v_tp
    # Embedding: gather rows; backward scatters them into a dense [V/tp, h] fp32 gradient.
    embed_fwd_bytes = 2 * hidden_bytes
    embed_bwd_bytes = 2 * hidden_bytes + 3 * FP32 * head_w
    head_params = head_w + shard.final_norm  # counted even when tied: each end holds a copy
    source = (f"analytical: {device.name} ({device.peak_flops / 1e12:.0f} TFLOP/s bf16 peak x "
              f"{device.efficiency:.2f} sustained, {device.p2p_bandwidth / 1e9:.0f} GB/s "
              f"between stages), tp {tp} ep {ep} dp {dp}{' ZeRO-1' if zero else ''}, "
              f"{micro_batch_size} x {seq_len} tokens per micro-batch")
    return CostProfile(
        layer_forward=forward,
        layer_backward=[2 * t for t in forward],
        layer_recompute=forward,
        layer_activation=activation,
        layer_checkpoint=[hidden_bytes] * n,
        layer_static=static_bytes,
        embed_forward=embed_fwd_bytes / hbm,
        embed_backward=embed_bwd_bytes / hbm,
        embed_activation=INT64 * t_tok,
        embed_static=static(shard.embedding),
        head_forward=head_flops / sustained + head_fwd_bytes / hbm,
        head_backward=2 * head_flops / sustained + head_bwd_bytes / hbm,
        head_activation=(8 * t_tok * h + 4 * t_tok + 2 * t_tok * h + BF16 * head_w
                         + 4 * t_tok * v_tp),
        head_static=static(head_params),
        output_bytes=hidden_bytes,
        p2p_time=device.p2p_latency + hidden_bytes / device.p2p_bandwidth,
        source=source,
    )
