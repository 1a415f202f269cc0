"""A measured ``CostProfile``: time and count the real modules of a (small) config on this
machine, one layer of each kind, the embedding and the head + loss (see ``skymoe.planning.cost``
for what a profile holds and the training it describes)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from ..config import SkyworkMoeConfig
from ..errors import ConfigError
from ..model.moe import MoEBalance, MoEOutput, MoETrainingOptions
from ..model.transformer import build_model
from .cost import ADAM_BYTES, GRAD_BYTES, WEIGHT_BYTES, CostProfile


PRECISIONS = ("bf16", "fp32")
BALANCE_COEF = 0.01


# ------------------------------------------------------------------------------ counting
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


class _Bench:
    """The model (its first layer of each kind), the inputs and the timing settings."""

    def __init__(self, config: SkyworkMoeConfig, seq_len: int, micro_batch_size: int,
                 precision: str, dev: torch.device, repeats: int, warmup: int,
                 seed: int) -> None:
        c = config
        self.kinds = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)]
        self.first_of = {kind: self.kinds.index(kind) for kind in set(self.kinds)}
        # Only the layers up to the first of each kind are built (an MoE layer may come second).
        small = dataclasses.replace(c, num_hidden_layers=max(self.first_of.values()) + 1)
        self.model = model = build_model(small, device=dev, dtype=torch.float32,
                                         seed=seed).train()
        # The MoE balance loss on in every MoE layer, as in training.
        self.balance = MoEBalance(MoETrainingOptions(capacity_factor=1.0),
                                  dict.fromkeys(range(small.num_hidden_layers), BALANCE_COEF))
        self.params = list(model.parameters())
        self.autocast = ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
                         if precision == "bf16" else contextlib.nullcontext)
        self.timer = _Timer(dev)
        self.repeats, self.warmup = repeats, warmup
        gen = torch.Generator(device=dev).manual_seed(seed)
        b, t, h = micro_batch_size, seq_len, c.hidden_size
        self.ids = torch.randint(c.vocab_size, (b, t), device=dev, generator=gen)
        self.x0 = torch.randn(b, t, h, device=dev, generator=gen)
        self.grad = torch.randn(b, t, h, device=dev, generator=gen)
        # As in the pipeline stage: tables in the dtype of the (fp32) residual stream, made
        # once per stage forward and shared by its layers.
        self.cos, self.sin = model.rotary.cos_sin(0, t, dev, self.x0.dtype)
        self.shared = self.params + [self.cos, self.sin]

    def median_times(self, forward: Callable[[torch.Tensor], torch.Tensor],
                     backward: Callable[[torch.Tensor], None]) -> tuple[float, float]:
        fwd, bwd = [], []
        for i in range(self.warmup + self.repeats):
            x = self.x0.detach().requires_grad_()
            out, tf = self.timer(lambda: forward(x))
            _, tb = self.timer(lambda: backward(out))
            if i >= self.warmup:
                fwd.append(tf)
                bwd.append(tb)
            self.model.zero_grad(set_to_none=True)
        return statistics.median(fwd), statistics.median(bwd)

    def layer_backward(self, out: tuple[torch.Tensor, MoEOutput | None]) -> None:
        """Backward of a layer's output and (an MoE layer) its balance loss: the pipeline
        attaches the balance loss to the activations, so it backpropagates."""
        y, moe = out
        outputs, grads = [y], [self.grad]
        if moe is not None:
            outputs.append(moe.aux)
            grads.append(torch.ones_like(moe.aux))
        torch.autograd.backward(outputs, grads)

    def layer(self, index: int) -> _LayerCost:
        """Decoder layer ``index`` plain, recomputed (checkpointed) and counted."""
        layer, timer, autocast = self.model.model.layers[index], self.timer, self.autocast
        cos, sin, balance = self.cos, self.sin, self.balance

        def plain(x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput | None]:
            with autocast():
                return layer(x, cos, sin, None, 0, balance)

        recompute_times: list[float] = []

        def timed_layer(*args) -> tuple[torch.Tensor, MoEOutput | None]:
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

        def recomputed(x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput | None]:
            with autocast():
                return checkpoint(timed_layer, x, cos, sin, None, 0, balance,
                                  use_reentrant=False)

        fwd, bwd = self.median_times(plain, self.layer_backward)
        for _ in range(self.warmup + self.repeats):
            y = recomputed(self.x0.detach().requires_grad_())
            recompute_times.pop()  # the forward call
            self.layer_backward(y)
            self.model.zero_grad(set_to_none=True)
        recompute = statistics.median(recompute_times[self.warmup:])
        x = self.x0.detach().requires_grad_()
        act = _saved_bytes(lambda: plain(x), self.shared)
        return _LayerCost(fwd, bwd, recompute, act, x.untyped_storage().nbytes(),
                          sum(p.numel() for p in layer.parameters()))

    def embedding(self) -> tuple[float, float, int]:
        """Forward and backward seconds and saved bytes of the token embedding."""
        model, autocast = self.model, self.autocast

        def embed(_: torch.Tensor) -> torch.Tensor:  # token ids in, not hidden states
            with autocast():
                return model.model.embed_tokens(self.ids)

        fwd, bwd = self.median_times(embed, lambda y: y.backward(self.grad))
        return fwd, bwd, _saved_bytes(lambda: embed(self.x0), self.params)

    def head(self) -> tuple[float, float, int]:
        """Forward and backward seconds of final norm + LM head + loss, and the bytes kept
        for its backward, the logits included."""
        model, autocast = self.model, self.autocast
        logits_bytes = []

        def head(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                logits = model.lm_head(model.model.norm(x))
                # The schedule keeps the stage output (the logits) until this micro-batch's
                # backward.
                logits_bytes.append(logits.untyped_storage().nbytes())
                return model.loss_function(logits, self.ids)

        fwd, bwd = self.median_times(head, lambda loss: loss.backward())
        x = self.x0.detach().requires_grad_()
        saved = _saved_bytes(lambda: head(x), self.params)
        return fwd, bwd, saved + logits_bytes[-1]


def _check(precision: str, seq_len: int, micro_batch_size: int, repeats: int,
           warmup: int) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if seq_len < 2 or micro_batch_size < 1:
        raise ConfigError(f"sequence length ({seq_len}) must be >= 2 and micro-batch size "
                          f"({micro_batch_size}) >= 1 to measure a training step")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats ({repeats}) must be >= 1 and warmup ({warmup}) >= 0")


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
    _check(precision, seq_len, micro_batch_size, repeats, warmup)
    dev = torch.device(device)
    bench = _Bench(config, seq_len, micro_batch_size, precision, dev, repeats, warmup, seed)
    per_kind = {kind: bench.layer(index) for kind, index in bench.first_of.items()}
    embed_fwd, embed_bwd, embed_act = bench.embedding()
    head_fwd, head_bwd, head_act = bench.head()
    model = bench.model
    per_param = WEIGHT_BYTES + GRAD_BYTES + ADAM_BYTES / (dp if zero else 1)
    embed_params = model.model.embed_tokens.weight.numel()
    head_params = model.model.norm.weight.numel() + model.lm_head.weight.numel()
    output_bytes = bench.x0.untyped_storage().nbytes()
    rows = [per_kind[kind] for kind in bench.kinds]
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
        head_activation=head_act,
        head_static=round(head_params * per_param),
        output_bytes=output_bytes,
        p2p_time=p2p_latency + output_bytes / p2p_bandwidth,
        source=(f"measured on {where}, {precision}, {micro_batch_size} x {seq_len} tokens per "
                f"micro-batch, median of {repeats}; p2p priced at {p2p_bandwidth / 1e9:g} GB/s"),
    )
