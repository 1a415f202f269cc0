"""What one micro-batch costs on one pipeline rank, per piece of the model: the input the
pipeline planner (``pipeline_planner``) splits and schedules.

A ``CostProfile`` lists, per decoder layer (dense and MoE layers differ) and for the embedding
and the head (final norm + LM head + loss): forward, backward and recompute seconds, the bytes
autograd keeps for backward, and the static bytes of parameters, gradients and AdamW states.
Two ways to get one:

- ``measure_profile``: time and count the real modules on this machine (small configs);
- ``analytical_profile``: FLOPs at a device's sustained rate and byte formulas for the saved
  tensors, for configs too large to run here (the real Skywork-MoE on A800s).

Both describe training as skymoe runs it: fp32 master weights under bf16 autocast (fp32
residual stream and norms, bf16 matmul inputs and outputs), AdamW with fp32 moments (ZeRO-1
shards the moments over data parallelism), MoE layers with capacity-factor-1.0 drops and the
balance loss on, and the pipeline stage forward entered once per micro-batch, each in its own
autocast region (``PipelineStageModel``). That last point matters for memory: autocast's bf16
copies of the weights are made per micro-batch and autograd keeps them until that
micro-batch's backward, so they count as per-micro-batch bytes, not static ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..config import SkyworkMoeConfig
from ..errors import ConfigError
from .layout import ParallelLayout

GIB = 2**30
FP32, BF16, INT64 = 4, 2, 8
# Static bytes per parameter: fp32 weight, fp32 gradient, two fp32 AdamW moments.
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
PRECISIONS = ("bf16", "fp32")


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


def _router_params(config: SkyworkMoeConfig) -> int:
    h, e = config.hidden_size, config.num_experts
    return (h * 8 * e + 8 * e * e) if config.moe_2layer_gate else h * e


def analytical_profile(config: SkyworkMoeConfig, seq_len: int, micro_batch_size: int,
                       device: DeviceSpec, tp: int = 1, ep: int = 1, dp: int = 1,
                       zero: bool = True) -> CostProfile:
    """Costs of one micro-batch of ``micro_batch_size`` x ``seq_len`` tokens on the fullest
    rank of a stage, from the config alone (bf16 autocast training; EDP: attention and dense
    MLPs split over ``tp``, experts over ``ep``, ``dp`` data-parallel replicas).

    With T = micro_batch_size * seq_len tokens, h hidden, F intermediate, d head size, a / a_kv
    query / KV heads per TP rank (ceil(heads / tp)), E experts, k = top-k:

    Time. Forward FLOPs per layer (2 per multiply-add, as ``flops_per_token``): attention
    projections 2 T h (2 a + 2 a_kv) d, causal scores and values 2 T a d seq_len, router
    2 T h E, dense MLP 2 T 3 h F / tp, MoE experts 2 R 3 h F with R = T_m k rows, where
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
    ParallelLayout(dp=dp, tp=tp, ep=ep).validate(config=c)
    t_tok = micro_batch_size * seq_len
    h, f, d, v = c.hidden_size, c.intermediate_size, c.head_size, c.vocab_size
    a = _ceil_div(c.num_attention_heads, tp)
    a_kv = _ceil_div(c.num_key_value_heads, tp)
    e, k = c.num_experts, c.num_experts_per_tok
    f_tp, v_tp = _ceil_div(f, tp), _ceil_div(v, tp)
    t_moe = _ceil_div(t_tok, tp)
    rows = t_moe * k
    sustained, hbm = device.sustained_flops, device.hbm_bandwidth

    def static(dense: int, expert: int = 0) -> int:
        dense_opt = ADAM_BYTES / (dp if zero else 1)
        expert_opt = ADAM_BYTES / (dp * tp // ep if zero else 1)
        return round(dense * (WEIGHT_BYTES + GRAD_BYTES + dense_opt)
                     + expert * (WEIGHT_BYTES + GRAD_BYTES + expert_opt))

    attn_w = 2 * h * a * d + 2 * h * a_kv * d
    attn_flops = 2 * t_tok * attn_w + 2 * t_tok * a * d * seq_len
    attn_bytes = (8 * t_tok * h + 4 * t_tok + 6 * t_tok * h + 2 * t_tok * (2 * a + 2 * a_kv) * d
                  + 4 * t_tok * a + 8 * t_tok * h + 4 * t_tok + BF16 * attn_w)
    forward, activation, static_bytes = [], [], []
    norms = 2 * h
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            router = _router_params(c)
            local_experts = _ceil_div(e, ep)
            expert_w = local_experts * 3 * h * f
            flops = attn_flops + 2 * t_tok * router + 2 * rows * 3 * h * f
            saved = (attn_bytes + 2 * t_tok * h + 12 * t_tok * e + 20 * t_tok * k + 22 * t_tok
                     + rows * (8 + 2 * h + 8 * f) + t_moe * k * (2 * h + 20)
                     + BF16 * (router + expert_w))
            params = static(attn_w + norms + router, expert_w)
        else:
            mlp_w = 3 * h * f_tp
            flops = attn_flops + 2 * t_tok * mlp_w
            saved = attn_bytes + 4 * t_tok * h + 8 * t_tok * f_tp + BF16 * mlp_w
            params = static(attn_w + norms + mlp_w)
        forward.append(flops / sustained)
        activation.append(saved)
        static_bytes.append(params)
    n = c.num_hidden_layers
    hidden_bytes = FP32 * t_tok * h
    head_w = v_tp * h
    head_flops = 2 * t_tok * head_w
    # Norm: read x, write normalized; loss: read bf16 logits, write the bf16 gradient.
    head_fwd_bytes = 2 * hidden_bytes + 4 * t_tok * v_tp
    head_bwd_bytes = 4 * hidden_bytes + 4 * t_tok * v_tp
    # Embedding: gather rows; backward scatters them into a dense [V/tp, h] fp32 gradient.
    embed_fwd_bytes = 2 * hidden_bytes
    embed_bwd_bytes = 2 * hidden_bytes + 3 * FP32 * head_w
    head_params = head_w + h
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
        embed_static=static(head_w),
        head_forward=head_flops / sustained + head_fwd_bytes / hbm,
        head_backward=2 * head_flops / sustained + head_bwd_bytes / hbm,
        head_activation=(8 * t_tok * h + 4 * t_tok + 2 * t_tok * h + BF16 * head_w
                         + 4 * t_tok * v_tp),
        head_static=static(head_params),
        output_bytes=hidden_bytes,
        p2p_time=device.p2p_latency + hidden_bytes / device.p2p_bandwidth,
        source=source,
    )


# -------------------------------------------------------------------------------- measured
def _saved_bytes(fn: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Run ``fn`` and count the bytes autograd saves for backward, each storage once (views
    share one), leaving out the storages of ``exclude`` (parameters, shared rotary tables)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class _LayerCost(NamedTuple):
    forward: float
    backward: float
    recompute: float
    activation: int
    checkpoint: int
    params: int


class _Timer:
    """Wall-clock seconds of a callable, synchronizing the accelerator around it."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable[[], object]) -> tuple[object, float]:
        self.sync()
        began = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - began


def measure_profile(config: SkyworkMoeConfig, seq_len: int, micro_batch_size: int,
                    precision: str = "bf16", device: str | torch.device = "cpu",
                    repeats: int = 5, warmup: int = 2, dp: int = 1, zero: bool = True,
                    p2p_bandwidth: float = 5e9, p2p_latency: float = 50e-6,
                    seed: int = 0) -> CostProfile:
    """Time and measure one micro-batch of ``micro_batch_size`` x ``seq_len`` tokens through
    one layer of each kind (dense, MoE; other layers of the same kind reuse its numbers), the
    embedding and the head + loss, on ``device`` without model parallelism.

    Training settings: fp32 weights under bf16 autocast (``precision="bf16"``) or plain fp32,
    MoE capacity factor 1.0 with drops and the balance loss. Each time is the median of
    ``repeats`` runs after ``warmup`` runs; recompute is the layer's forward as re-run inside
    the backward of a checkpointed layer. Saved bytes are counted with ``saved_tensors_hooks``
    (each storage once, parameters and the shared rotary tables left out); a recomputed layer
    keeps its input. Static bytes come from parameter counts (4 + 4 + 8 / ``dp`` with ZeRO-1).
    The point-to-point link is not measured: ``p2p_bandwidth`` (bytes/s) and ``p2p_latency``
    (s), by default an assumed 5 GB/s and 50 us between processes on one host, price sending
    the hidden states between stages.
    """
    from torch.utils.checkpoint import checkpoint

    from ..model.moe import MoEBalance, MoEOutput, MoETrainingOptions
    from ..model.transformer import build_model

    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if seq_len < 2 or micro_batch_size < 1:
        raise ConfigError(f"sequence length ({seq_len}) must be >= 2 and micro-batch size "
                          f"({micro_batch_size}) >= 1 to measure a training step")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats ({repeats}) must be >= 1 and warmup ({warmup}) >= 0")
    dev = torch.device(device)
    c = config
    kinds = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)]
    first_of = {kind: kinds.index(kind) for kind in set(kinds)}
    # Only the layers up to the first of each kind are built (an MoE layer may come second).
    small = dataclasses.replace(c, num_hidden_layers=max(first_of.values()) + 1)
    model = build_model(small, device=dev, dtype=torch.float32, seed=seed).train()
    balance = MoEBalance(MoETrainingOptions(capacity_factor=1.0),
                         {i: 0.01 for i in range(small.num_hidden_layers)})
    params = list(model.parameters())
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    timer = _Timer(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    b, t, h = micro_batch_size, seq_len, c.hidden_size
    ids = torch.randint(c.vocab_size, (b, t), device=dev, generator=gen)
    x0 = torch.randn(b, t, h, device=dev, generator=gen)
    grad = torch.randn(b, t, h, device=dev, generator=gen)
    # As in the pipeline stage: tables in the dtype of the (fp32) residual stream, made once
    # per stage forward and shared by its layers.
    cos, sin = model.rotary.cos_sin(0, t, dev, x0.dtype)
    shared = params + [cos, sin]

    def median_times(forward: Callable[[torch.Tensor], torch.Tensor],
                     backward: Callable[[torch.Tensor], None]) -> tuple[float, float]:
        fwd, bwd = [], []
        for i in range(warmup + repeats):
            x = x0.detach().requires_grad_()
            out, tf = timer(lambda: forward(x))
            _, tb = timer(lambda: backward(out))
            if i >= warmup:
                fwd.append(tf)
                bwd.append(tb)
            model.zero_grad(set_to_none=True)
        return statistics.median(fwd), statistics.median(bwd)

    def layer_backward(out: tuple[torch.Tensor, MoEOutput | None]) -> None:
        y, moe = out
        outputs, grads = [y], [grad]
        if moe is not None:
            # The pipeline attaches the balance loss to the activations: it backpropagates.
            outputs.append(moe.aux)
            grads.append(torch.ones_like(moe.aux))
        torch.autograd.backward(outputs, grads)

    per_kind: dict[bool, _LayerCost] = {}
    for kind, index in first_of.items():
        layer = model.model.layers[index]

        def plain(x: torch.Tensor, layer=layer) -> torch.Tensor:
            with autocast():
                return layer(x, cos, sin, None, 0, balance)

        recompute_times: list[float] = []

        def timed_layer(*args, layer=layer) -> torch.Tensor:
            # Called once in forward and again by the recomputation in backward; the backward
            # call's time is the recompute cost. The checkpoint may stop the recomputation
            # early (an exception), hence finally.
            timer.sync()
            began = time.perf_counter()
            try:
                return layer(*args)
            finally:
                timer.sync()
                recompute_times.append(time.perf_counter() - began)

        def recomputed(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return checkpoint(timed_layer, x, cos, sin, None, 0, balance,
                                  use_reentrant=False)

        fwd, bwd = median_times(plain, layer_backward)
        for _ in range(warmup + repeats):
            y = recomputed(x0.detach().requires_grad_())
            recompute_times.pop()  # the forward call
            layer_backward(y)
            model.zero_grad(set_to_none=True)
        recompute = statistics.median(recompute_times[warmup:])
        x = x0.detach().requires_grad_()
        act = _saved_bytes(lambda: plain(x), shared)
        per_kind[kind] = _LayerCost(fwd, bwd, recompute, act, x.untyped_storage().nbytes(),
                                    sum(p.numel() for p in layer.parameters()))

    per_param = WEIGHT_BYTES + GRAD_BYTES + ADAM_BYTES / (dp if zero else 1)

    def embed(_: torch.Tensor) -> torch.Tensor:  # token ids in, not hidden states
        with autocast():
            return model.model.embed_tokens(ids)

    embed_fwd, embed_bwd = median_times(embed, lambda y: y.backward(grad))
    embed_act = _saved_bytes(lambda: embed(x0), params)

    logits_bytes = []

    def head(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model.lm_head(model.model.norm(x))
            # The schedule keeps the stage output (the logits) until this micro-batch's backward.
            logits_bytes.append(logits.untyped_storage().nbytes())
            return model.loss_function(logits, ids)

    head_fwd, head_bwd = median_times(head, lambda loss: loss.backward())
    x = x0.detach().requires_grad_()
    head_saved = _saved_bytes(lambda: head(x), params)
    embed_params = model.model.embed_tokens.weight.numel()
    head_params = model.model.norm.weight.numel() + model.lm_head.weight.numel()
    output_bytes = x0.untyped_storage().nbytes()
    rows = [per_kind[kind] for kind in kinds]
    threads = torch.get_num_threads()
    where = dev.type + (f" ({threads} thread{'s' if threads > 1 else ''})"
                        if dev.type == "cpu" else "")
    return CostProfile(
        layer_forward=[r.forward for r in rows],
        layer_backward=[r.backward for r in rows],
        layer_recompute=[r.recompute for r in rows],
        layer_activation=[r.activation for r in rows],
        layer_checkpoint=[r.checkpoint for r in rows],
        layer_static=[round(r.params * per_param) for r in rows],
        embed_forward=embed_fwd,
        embed_backward=embed_bwd,
        embed_activation=embed_act,
        embed_static=round(embed_params * per_param),
        head_forward=head_fwd,
        head_backward=head_bwd,
        head_activation=head_saved + logits_bytes[-1],
        head_static=round(head_params * per_param),
        output_bytes=output_bytes,
        p2p_time=p2p_latency + output_bytes / p2p_bandwidth,
        source=(f"measured on {where}, {precision}, {micro_batch_size} x {seq_len} tokens per "
                f"micro-batch, median of {repeats}; p2p priced at {p2p_bandwidth / 1e9:g} GB/s"),
    )
