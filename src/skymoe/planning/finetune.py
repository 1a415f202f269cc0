"""``skymoe plan finetune``: the bytes per GPU of fine-tuning a model, and whether it fits.

A layout is ``dp`` data-parallel replicas of a ``pp``-stage pipeline whose experts are split
over ``ep`` of each stage's ``dp`` ranks (expert parallelism inside data parallelism; ``ep`` = 1:
every rank holds every expert): each stage holds a contiguous, even split of the decoder
layers, the first also the embedding, the last the final norm and LM head, and each rank
``1/ep`` of every MoE layer's experts. The fullest stage's rank counts:

- weights: the base at its bytes per value. Full fine-tuning keeps fp32 master weights (4 B);
  LoRA keeps the frozen base in bf16 (2 B), or FP8 (1 B for the projections plus a 4-byte scale
  per projection, the router, norms and embeddings in bf16), or fp32;
- adapters (LoRA): fp32 factors, ``rank x (in + out)`` per adapted projection and per expert
  (``w13``: ``rank x (hidden + 2 ffn)``; ``w2``: ``rank x (ffn + hidden)``);
- gradients: fp32, for what trains (every weight, or the adapters);
- optimizer: AdamW's two fp32 moments of what trains, split over its replicas (ZeRO-1): the
  ``dp`` ranks of a stage for the dense part, the ``dp / ep`` holding the same experts for the
  experts' part;
- activations: under a 1F1B schedule the first stage keeps up to ``pp`` micro-batches in flight;
  each keeps every layer's input (activation checkpointing), and one layer's full activations
  exist at a time while it is recomputed; the last stage adds the logits (the analytical cost
  model of ``plan pipeline``, bf16 autocast). A frozen base needs the same activations to pass
  gradients to earlier adapters, so the figure is the same for both methods; expert
  parallelism moves tokens, not their number (balanced routing), so it does not change it.

Plus ``reserve`` bytes per GPU for the CUDA context, communication buffers and fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arithmetic import LayerShard, RankShard, rank_shard, rank_weight_bytes
from ..config import SkyworkMoeConfig
from ..errors import ConfigError
from ..model.lora import LoRAConfig
from ..parallel.layout import ParallelLayout
from .cost import DEVICE_PRESETS, CostProfile, analytical_profile, format_bytes

METHODS = ("lora", "full")
BASE_DTYPES = ("fp8", "bf16", "fp32")


def lora_layer_params(config: SkyworkMoeConfig, layer: LayerShard, rank: int,
                      targets: tuple[str, ...]) -> int:
    """Adapter elements of one decoder layer's shard ``layer``."""
    return (_lora_dense_params(config, layer, rank, targets)
            + lora_expert_params(config, layer, rank, targets))


def _lora_dense_params(config: SkyworkMoeConfig, layer: LayerShard, rank: int,
                       targets: tuple[str, ...]) -> int:
    h, d = config.hidden_size, config.head_size
    sizes = {"q_proj": (h, layer.q_heads * d), "k_proj": (h, layer.kv_heads * d),
             "v_proj": (h, layer.kv_heads * d), "o_proj": (layer.q_heads * d, h)}
    if not layer.moe:
        sizes.update(gate_proj=(h, layer.ffn), up_proj=(h, layer.ffn), down_proj=(layer.ffn, h))
    return sum(rank * (i + o) for name, (i, o) in sizes.items() if name in targets)


def lora_expert_params(config: SkyworkMoeConfig, layer: LayerShard, rank: int,
                       targets: tuple[str, ...]) -> int:
    """Adapter elements of the experts ``layer`` holds (``w13``: ``rank x (hidden + 2 ffn)``,
    ``w2``: ``rank x (ffn + hidden)`` each)."""
    if not (layer.moe and "experts" in targets):
        return 0
    h, f = config.hidden_size, layer.expert_ffn
    return layer.experts * rank * ((h + 2 * f) + (f + h))


@dataclass(frozen=True)
class FinetuneMemory:
    """Bytes on the fullest GPU of one layout (see the module docstring)."""

    dp: int
    pp: int
    ep: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    reserve: int

    @property
    def total(self) -> int:
        return (self.weights + self.adapters + self.gradients + self.optimizer
                + self.activations + self.reserve)

    @property
    def gpus(self) -> int:
        return self.dp * self.pp


def _stages(layers: int, pp: int) -> list[range]:
    return [range(i * layers // pp, (i + 1) * layers // pp) for i in range(pp)]


def _base_bytes(whole: RankShard, stage: range, first: bool, last: bool, method: str,
                base_dtype: str) -> int:
    """Weight bytes of one stage's part of the model."""
    matmul, other, scale = {"fp8": (1, 2, 4), "bf16": (2, 2, 0), "fp32": (4, 4, 0)}[
        "fp32" if method == "full" else base_dtype]
    layers = RankShard(tuple(whole.layers[i] for i in stage), whole.hidden, 0, True)
    total = rank_weight_bytes(layers, matmul, other, scale) - layers.final_norm * other
    if first:
        total += whole.embedding * other
    if last:
        total += (whole.final_norm + (0 if whole.tied and first else whole.lm_head)) * other
    return total


def finetune_memory(config: SkyworkMoeConfig, dp: int, pp: int, method: str = "lora",
                    base_dtype: str = "bf16", rank: int = 16,
                    targets: tuple[str, ...] = LoRAConfig().targets, seq_len: int = 4096,
                    micro_batch_size: int = 1, reserve: int = 2 * 2**30,
                    profile: CostProfile | None = None, ep: int = 1) -> FinetuneMemory:
    """The fullest GPU's bytes of ``method`` fine-tuning under ``dp`` x ``pp`` with the experts
    split over ``ep`` ranks (``profile``: the activation sizes of ``analytical_profile`` at this
    ``seq_len`` and micro-batch, to reuse across layouts)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, not {method!r}")
    if base_dtype not in BASE_DTYPES:
        raise ConfigError(f"base dtype must be one of {BASE_DTYPES}, not {base_dtype!r}")
    if not 1 <= pp <= config.num_hidden_layers or dp < 1:
        raise ConfigError(f"a layout needs dp >= 1 and 1 <= pp <= {config.num_hidden_layers} "
                          f"(the decoder layers), got dp {dp}, pp {pp}")
    if ep < 1 or dp % ep or config.num_experts % ep:
        raise ConfigError(f"ep = {ep} must divide dp ({dp}) and the {config.num_experts} "
                          "experts")
    whole = rank_shard(config, ParallelLayout(dp=dp, ep=ep))
    profile = profile or _activation_profile(config, seq_len, micro_batch_size)
    best: FinetuneMemory | None = None
    stages = _stages(config.num_hidden_layers, pp)
    for s, stage in enumerate(stages):
        first, last = s == 0, s == pp - 1
        weights = _base_bytes(whole, stage, first, last, method, base_dtype)
        if method == "full":
            expert = sum(whole.layers[i].expert_total for i in stage)
            dense = weights // 4 - expert
            adapters = 0
        else:
            expert = sum(lora_expert_params(config, whole.layers[i], rank, targets)
                         for i in stage)
            dense = sum(_lora_dense_params(config, whole.layers[i], rank, targets)
                        for i in stage)
            adapters = 4 * (dense + expert)
        in_flight = pp - s  # 1F1B: stage s holds up to pp - s micro-batches' activations
        activations = in_flight * (sum(profile.layer_checkpoint[i] for i in stage)
                                   + (profile.embed_activation if first else 0))
        activations += max((profile.layer_activation[i] for i in stage), default=0)
        if last:
            activations += profile.head_activation
        optimizer = -(-8 * dense // dp) + -(-8 * expert // (dp // ep))
        candidate = FinetuneMemory(dp, pp, ep, weights, adapters, 4 * (dense + expert),
                                   optimizer, activations, reserve)
        if best is None or candidate.total > best.total:
            best = candidate
    assert best is not None
    return best


def _activation_profile(config: SkyworkMoeConfig, seq_len: int, micro_batch_size: int
                        ) -> CostProfile:
    # Only the activation sizes are used; they do not depend on the device.
    return analytical_profile(config, seq_len, micro_batch_size, DEVICE_PRESETS["h100"])


def layouts(gpus: int, config: SkyworkMoeConfig) -> list[tuple[int, int, int]]:
    """Every (dp, pp, ep) with dp * pp = ``gpus``, pp <= the model's layers and ep dividing
    both dp and the experts (ep = 1 only for a dense model), fewest stages first."""
    has_moe = any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return [(gpus // pp, pp, ep) for pp in range(1, min(gpus, config.num_hidden_layers) + 1)
            if gpus % pp == 0 for ep in range(1, gpus // pp + 1)
            if (gpus // pp) % ep == 0 and config.num_experts % ep == 0 and (has_moe or ep == 1)]


@dataclass(frozen=True)
class FinetunePlan:
    """The layouts of ``gpus`` GPUs and, if none fits, the fewest GPUs whose layout does."""

    gpus: int
    memory: int
    options: tuple[FinetuneMemory, ...]
    smallest_fit: FinetuneMemory | None

    @property
    def fits(self) -> tuple[FinetuneMemory, ...]:
        return tuple(o for o in self.options if o.total <= self.memory)


def plan_finetune(config: SkyworkMoeConfig, gpus: int, memory: int, max_gpus: int = 4096,
                  **settings) -> FinetunePlan:
    """Every layout of ``gpus`` GPUs of ``memory`` bytes, and the smallest GPU count (up to
    ``max_gpus``) with a layout that fits. ``settings``: those of ``finetune_memory``."""
    if gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    profile = _activation_profile(config, settings.get("seq_len", 4096),
                                  settings.get("micro_batch_size", 1))

    def options(n: int) -> list[FinetuneMemory]:
        return [finetune_memory(config, dp, pp, profile=profile, ep=ep, **settings)
                for dp, pp, ep in layouts(n, config)]

    here = options(gpus)
    smallest = None
    for n in range(1, max_gpus + 1):
        fitting = [o for o in options(n) if o.total <= memory]
        if fitting:
            smallest = min(fitting, key=lambda o: o.total)
            break
    return FinetunePlan(gpus, memory, tuple(here), smallest)


def format_finetune_plan(plan: FinetunePlan, what: str) -> str:
    """The plan as a table of layouts and a verdict; ``what`` names the method and model."""
    head = (f"{what} on {plan.gpus} GPU(s) of {format_bytes(plan.memory)}; per GPU, the "
            "fullest pipeline stage:")
    rows = ["| dp x pp | ep | weights | adapters | gradients | optimizer | activations | "
            "reserve | total | fits |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for o in plan.options:
        rows.append(f"| {o.dp} x {o.pp} | {o.ep} | " + " | ".join(format_bytes(b) for b in (
            o.weights, o.adapters, o.gradients, o.optimizer, o.activations, o.reserve,
            o.total)) + f" | {'yes' if o.total <= plan.memory else 'no'} |")
    if plan.fits:
        best = min(plan.fits, key=lambda o: o.total)
        verdict = (f"fits: {len(plan.fits)} of {len(plan.options)} layouts; the most headroom "
                   f"with {_name(best)} ({format_bytes(best.total)} of "
                   f"{format_bytes(plan.memory)})")
    else:
        verdict = f"does not fit on {plan.gpus} GPU(s) in any layout"
    s = plan.smallest_fit
    smallest = (f"smallest layout that fits: {s.gpus} GPU(s), {_name(s)} "
                f"({format_bytes(s.total)})" if s is not None
                else "no layout of up to the searched GPU count fits")
    return "\n".join([head, *rows, verdict, smallest])


def _name(o: FinetuneMemory) -> str:
    return f"dp {o.dp} x pp {o.pp}" + (f", ep {o.ep}" if o.ep > 1 else "")


__all__ = ["BASE_DTYPES", "FinetuneMemory", "FinetunePlan", "METHODS", "finetune_memory",
           "format_finetune_plan", "layouts", "lora_expert_params", "lora_layer_params",
           "plan_finetune"]
