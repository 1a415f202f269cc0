"""``skymoe plan serve`` (does a model fit on N GPUs, how fast) and ``skymoe plan pipeline``
(layers and recomputation per pipeline stage), computed from a model config.

Both planners live in ``skymoe.planning``; the pipeline schedules come from the registry the
runtime uses (``skymoe.parallel.schedules``): every one of them is planned or refused by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

import torch

from ..config import SkyworkMoeConfig, resolve_config
from ..errors import ConfigError
from ..parallel.pipeline_layout import PipelineLayout
from ..parallel.schedules import SCHEDULES
from ..model.lora import TARGETS as LORA_TARGETS, LoRAConfig
from ..planning.cost import DEVICE_PRESETS, CostProfile, DeviceSpec, analytical_profile
from ..planning.finetune import (BASE_DTYPES, METHODS, format_finetune_plan,
                                 plan_finetune)
from ..planning.measure import measure_profile
from ..planning.orders import check_plannable
from ..planning.report import format_plan as format_pipeline_plan
from ..planning.search import evaluate_layout, plan_pipeline
from ..planning.serving import GPU_PRESETS, KV_BYTES, WEIGHT_BYTES, format_plan, plan_serve
from ..units import parse_size
from . import flags
from .flags import UsageError


def register(plan: argparse._SubParsersAction) -> None:
    """Add ``plan serve``, ``plan pipeline`` and ``plan finetune``."""
    p = plan.add_parser(
        "serve", help="does a model fit on N GPUs with tensor parallelism, and how fast?",
        description="Weights and KV-cache capacity per rank under non-uniform tensor "
                    "parallelism (first heads %% N ranks take one extra head, experts split "
                    "along the intermediate size, vocab padded to a multiple of 24), whether it "
                    "fits, and a memory-bandwidth estimate of decode throughput vs batch size.")
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                   help=f"{flags.ANY_MODEL} (required)")
    p.add_argument("--model", action=flags.DeprecatedAlias, default=None,
                   use="MODEL (the first argument)")
    p.add_argument("--gpus", type=int, required=True, help="tensor-parallel GPUs")
    p.add_argument("--gpu", choices=sorted(GPU_PRESETS), default="4090",
                   help="GPU preset for memory and bandwidths (default 4090)")
    p.add_argument("--gpu-mem", help="GPU memory, e.g. 24GiB (overrides the preset)")
    p.add_argument("--bandwidth", type=float, help="GPU memory bandwidth in GB/s")
    p.add_argument("--link-bandwidth", type=float, help="GPU-to-GPU bandwidth in GB/s")
    p.add_argument("--reserve", default="1.5GiB",
                   help="memory per GPU kept for context/activations (default 1.5GiB)")
    p.add_argument("--weight-dtype", choices=sorted(WEIGHT_BYTES), default="fp8",
                   help="storage format of the attention and expert weights (default fp8)")
    p.add_argument("--dtype", dest="weight_dtype", choices=sorted(WEIGHT_BYTES),
                   action=flags.DeprecatedAlias, use="--weight-dtype")
    p.add_argument("--kv-dtype", choices=sorted(KV_BYTES), default="bf16",
                   help="KV cache dtype (default bf16)")
    p.add_argument("--context", type=int, default=1024,
                   help="average cached tokens per sequence for the estimate (default 1024)")
    p.set_defaults(func=cmd_plan_serve)
    _register_pipeline(plan)
    _register_finetune(plan)


def _register_finetune(plan: argparse._SubParsersAction) -> None:
    p = plan.add_parser(
        "finetune", help="can this model be fine-tuned on N GPUs, and in which layout?",
        description="Bytes per GPU of fine-tuning (LoRA over a frozen fp8/bf16/fp32 base, or "
                    "full) under every data x pipeline layout of --gpus GPUs, the experts split "
                    "over ep of the data-parallel ranks or not: weights, "
                    "adapters, gradients, AdamW states (ZeRO-1) and activations (1F1B, layer "
                    "inputs kept, one layer recomputed at a time) at --seq-len and "
                    "--micro-batch-size; whether it fits, and the fewest GPUs that fit. See "
                    "docs/finetuning.md.")
    p.add_argument("model", metavar="MODEL", help=flags.ANY_MODEL)
    p.add_argument("--gpus", type=int, required=True, help="GPUs to fine-tune on")
    p.add_argument("--gpu-mem", default="80GiB", help="memory per GPU (default 80GiB)")
    p.add_argument("--method", choices=METHODS, default="lora", help="default lora")
    p.add_argument("--base-dtype", choices=BASE_DTYPES, default="bf16",
                   help="LoRA's frozen base (default bf16); full fine-tuning keeps fp32 "
                        "master weights")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default=",".join(LoRAConfig().targets),
                   help="LoRA targets, comma-separated (default attention and experts)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="sequences per micro-batch (default 1)")
    p.add_argument("--reserve", default="2GiB",
                   help="memory per GPU kept for the CUDA context, communication buffers and "
                        "fragmentation (default 2GiB)")
    p.set_defaults(func=cmd_plan_finetune)


def _register_pipeline(plan: argparse._SubParsersAction) -> None:
    p = plan.add_parser(
        "pipeline", help="layers and recomputed layers per pipeline stage for training",
        description="Choose decoder layers per pipeline stage and how many of them recompute "
                    "their activations, minimizing the simulated step time of the 1f1b, gpipe, "
                    "interleaved-1f1b or looped-bfs schedule while every rank fits in memory "
                    "(zero-bubble and zbv are refused: their split backward is not modelled; the "
                    "first "
                    "stage also runs the embedding and holds the most micro-batches in flight, "
                    "the last runs the LM head and loss). Costs come from the config "
                    "(analytical: FLOPs at a GPU preset's sustained rate, saved-tensor byte "
                    "formulas) or from timing the model's layers on this machine's CPU "
                    "(measured). With --layout, evaluate that layout instead.")
    flags.add_model(p, flags.ANY_MODEL)
    p.add_argument("--stages", type=int,
                   help="pipeline ranks P, one stage each unless --stages-per-rank (required "
                        "unless --layout gives them)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="sequences per micro-batch (default 1)")
    p.add_argument("--micro-batches", type=int,
                   help="micro-batches per step on each pipeline (default 4 x stages)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="1f1b",
                   help="pipeline schedule (default 1f1b)")
    p.add_argument("--stages-per-rank", type=int, default=1,
                   help="stages V on each pipeline rank: the layout has P x V stages, rank r "
                        "holding r, r + P, ... (default 1; interleaved-1f1b and looped-bfs "
                        "need >= 2)")
    p.add_argument("--profile", choices=("analytical", "measured"), default="analytical",
                   help="costs from FLOP and byte formulas for --device-preset (default), or "
                        "measured by running the layers on this machine's CPU")
    p.add_argument("--device-preset", choices=sorted(DEVICE_PRESETS), default="a800",
                   help="training GPU for the analytical costs and the default memory "
                        "(default a800)")
    p.add_argument("--memory",
                   help="memory per device for weights, gradients, optimizer states and "
                        "activations, e.g. 80GB (default: the preset's, less 2 GiB for the "
                        "CUDA context and allocator slack)")
    flags.add_tp(p, "modelled (analytical profile only)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (analytical)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel size: ZeRO-1 shards the optimizer states over it")
    p.add_argument("--no-zero", action="store_true",
                   help="optimizer states replicated over data parallelism (no ZeRO-1)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast over fp32 weights (default) or fp32 (measured only)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per measurement, median taken (measured; default 5)")
    p.add_argument("--threads", type=int,
                   help="CPU threads while measuring (default: this machine's cores / stages, "
                        "what each stage's process gets when all run here)")
    p.add_argument("--layout", help="layers per stage (P x V counts) to evaluate instead of "
                                    "planning, e.g. 5,5,5,5,4")
    p.add_argument("--recompute", help="recomputed layers per stage for --layout, e.g. 2,1,0,0,0 "
                                       "(default none)")
    p.set_defaults(func=cmd_plan_pipeline)


def cmd_plan_serve(args: argparse.Namespace) -> None:
    """Print the serving plan for ``--gpus`` GPUs of the ``--gpu`` preset (as overridden)."""
    if args.model is None:
        raise UsageError(f"give MODEL: a {flags.ANY_MODEL}")
    changes = {"reserve": parse_size(args.reserve)}
    if args.gpu_mem:
        changes["memory"] = parse_size(args.gpu_mem)
    for flag, key in ((args.bandwidth, "bandwidth"), (args.link_bandwidth, "link_bandwidth")):
        if flag is not None:
            if not (flag > 0 and math.isfinite(flag)):
                raise ConfigError(f"--{key.replace('_', '-')} must be a positive number of GB/s")
            changes[key] = flag * 1e9
    gpu = dataclasses.replace(GPU_PRESETS[args.gpu], **changes)
    plan = plan_serve(resolve_config(args.model), args.gpus, gpu, args.weight_dtype,
                      args.kv_dtype, args.context)
    print(format_plan(plan))


def cmd_plan_finetune(args: argparse.Namespace) -> None:
    """Print the fine-tuning memory plan."""
    flags.require_positive(gpus=args.gpus, rank=args.rank, seq_len=args.seq_len,
                           micro_batch_size=args.micro_batch_size)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise UsageError(f"--targets: {unknown or 'none'} not among {', '.join(LORA_TARGETS)}")
    config = resolve_config(args.model)
    plan = plan_finetune(config, args.gpus, parse_size(args.gpu_mem), method=args.method,
                         base_dtype=args.base_dtype, rank=args.rank, targets=targets,
                         seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                         reserve=parse_size(args.reserve))
    what = (f"LoRA rank {args.rank} over a {args.base_dtype} base" if args.method == "lora"
            else "full fine-tuning (fp32 master weights, AdamW)")
    print(format_finetune_plan(plan, f"{what} of {args.model}, {args.micro_batch_size} x "
                                     f"{args.seq_len} tokens per micro-batch,"))


def cmd_plan_pipeline(args: argparse.Namespace) -> None:
    """Print the best layout for the cost profile (or the ``--layout``'s simulation) and the
    training config lines that use it."""
    layout, stages = _pipeline_shape(args)
    micro_batches = args.micro_batches if args.micro_batches is not None else 4 * stages
    flags.require_positive(stages=stages, seq_len=args.seq_len,
                           micro_batch_size=args.micro_batch_size, micro_batches=micro_batches,
                           tp=args.tp, ep=args.ep, dp=args.dp, repeats=args.repeats,
                           threads=1 if args.threads is None else args.threads)
    config = resolve_config(args.model)
    per_rank = args.stages_per_rank
    if layout is not None:
        layout.validate(config.num_hidden_layers, stages * per_rank)
    device = DEVICE_PRESETS[args.device_preset]
    memory = parse_size(args.memory) if args.memory else device.usable_memory
    profile = _cost_profile(args, config, device, stages)
    if layout is not None:
        plan = evaluate_layout(layout, profile, micro_batches, memory, args.schedule, per_rank)
    else:
        plan = plan_pipeline(profile, stages, micro_batches, memory, args.schedule, per_rank)
    print(format_pipeline_plan(plan))
    print(f"train config: [parallel] pp = {stages}, "
          + (f"pp_stages_per_rank = {per_rank}, " if per_rank > 1 else "")
          + f"pp_layers = \"{','.join(map(str, plan.layout.layers))}\", pp_recompute = "
          f"\"{','.join(map(str, plan.layout.recompute))}\", pp_schedule = \"{args.schedule}\"")


def _pipeline_shape(args: argparse.Namespace) -> tuple[PipelineLayout | None, int]:
    """The ``--layout`` (or None) and the pipeline ranks P, checked against the schedule and
    ``--stages-per-rank``."""
    if args.recompute and not args.layout:
        raise UsageError("--recompute needs --layout (the layers per stage it applies to)")
    layout = None
    if args.layout:
        try:
            layout = PipelineLayout.parse(args.layout, args.recompute or "")
        except ConfigError as exc:
            raise UsageError(f"--layout / --recompute: {exc}") from None
    per_rank = args.stages_per_rank
    if per_rank < 1:
        raise UsageError(f"--stages-per-rank must be >= 1, got {per_rank}")
    try:
        check_plannable(args.schedule)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    looped = SCHEDULES[args.schedule].placement != "single"
    if looped and per_rank < 2:
        raise UsageError(f"--schedule {args.schedule} runs several stages per pipeline rank; "
                         "give --stages-per-rank 2 or more (or use --schedule 1f1b)")
    if not looped and per_rank != 1:
        raise UsageError(f"--schedule {args.schedule} runs one stage per pipeline rank; "
                         "--stages-per-rank > 1 needs --schedule interleaved-1f1b or "
                         "looped-bfs")
    if layout is not None and (layout.stages % per_rank or (
            args.stages is not None and args.stages * per_rank != layout.stages)):
        ranks = f"--stages {args.stages}" if args.stages is not None else "P"
        raise UsageError(f"--layout {args.layout} has {layout.stages} stages but needs "
                         f"{ranks} x --stages-per-rank {per_rank} counts (one per stage)")
    stages = args.stages if args.stages is not None else (
        layout.stages // per_rank if layout is not None else None)
    if stages is None:
        raise UsageError("--stages is required (or give a --layout)")
    return layout, stages


def _cost_profile(args: argparse.Namespace, config: SkyworkMoeConfig, device: DeviceSpec,
                  stages: int) -> CostProfile:
    """Per-layer costs: analytical for ``--device-preset``, or measured on this CPU."""
    if args.profile == "analytical":
        if args.precision != "bf16":
            raise UsageError("the analytical profile models bf16 autocast training; use "
                             "--profile measured for --precision fp32")
        return analytical_profile(config, args.seq_len, args.micro_batch_size, device,
                                  tp=args.tp, ep=args.ep, dp=args.dp, zero=not args.no_zero)
    if args.tp > 1 or args.ep > 1:
        raise UsageError("--tp and --ep apply to the analytical profile; the measured one runs "
                         "whole layers on this machine")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // stages))
    return measure_profile(config, args.seq_len, args.micro_batch_size, args.precision,
                           repeats=args.repeats, dp=args.dp, zero=not args.no_zero)
