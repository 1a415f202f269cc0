"""Checkpoint conversions: ``skymoe upcycle`` (dense -> Skywork-MoE, or advice on whether to),
``skymoe quantize`` (-> FP8) and ``skymoe export`` (training checkpoint -> HF directory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import upcycle as up
from ..config import SkyworkMoeConfig, format_count, parameter_counts
from ..export import export_checkpoint
from ..merge import merge_adapter
from ..quantize import quantize_checkpoint
from ..units import parse_size
from . import flags
from .flags import UsageError


def register(top: argparse._SubParsersAction) -> None:
    """Add ``upcycle``, ``quantize``, ``export`` and ``merge``."""
    _register_upcycle(top)
    _register_export(top)
    _register_merge(top)
    p = top.add_parser(
        "quantize", help="write an FP8 checkpoint (vLLM / Skywork-MoE-FP8 convention)",
        description="Quantize an HF checkpoint to FP8: attention, expert and MLP projections "
                    "become float8_e4m3fn with one fp32 weight_scale per tensor (per expert per "
                    "matrix); router, embeddings, LM head and norms stay as they are; "
                    "config.json gets quantization_config {quant_method: fp8, "
                    "activation_scheme: dynamic}. Streamed tensor by tensor.")
    p.add_argument("in_dir", help="HF checkpoint directory (bf16 or fp32)")
    p.add_argument("out_dir", help="output directory")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", choices=["fp8"],
                    help="output format: fp8, e4m3 with per-tensor scales (the only one so far)")
    to.add_argument("--fp8", dest="to", action=flags.DeprecatedAlias, nargs=0, const="fp8",
                    use="--to fp8 (--fp8 elsewhere says how FP8 checkpoints load)")
    flags.add_output(p)
    p.set_defaults(func=cmd_quantize)


def _register_export(top: argparse._SubParsersAction) -> None:
    p = top.add_parser(
        "export", help="write a training checkpoint's model as an HF checkpoint directory",
        description="Write the model of a training checkpoint (sharded, as multi-process runs "
                    "save, or an HF-format one) as an HF checkpoint directory: config.json, "
                    "safetensors shards and the tokenizer, streamed one tensor at a time. "
                    "CKPT may be a run directory (its latest checkpoint is exported).")
    p.add_argument("ckpt", metavar="CKPT",
                   help="RUN_DIR/checkpoints/step-XXXXXXXX, or RUN_DIR for its latest")
    p.add_argument("out_dir", metavar="OUT", help="output directory")
    flags.add_dtype(p, why="the checkpoint's torch_dtype, float32 for a run's")
    p.add_argument("--to", choices=["fp8"],
                   help="fp8: write the FP8 convention of skymoe quantize (projections e4m3 "
                        "with per-tensor scales) directly")
    flags.add_output(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    """Write the HF directory and say what it holds."""
    out = export_checkpoint(args.ckpt, args.out_dir,
                            dtype=None if args.dtype == "auto" else args.dtype,
                            to_fp8=args.to == "fp8", overwrite=args.overwrite,
                            max_shard_bytes=parse_size(args.max_shard_size))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {size / 1e6:.1f} MB of safetensors"
          + (" (FP8)" if args.to == "fp8" else ""))


def _register_merge(top: argparse._SubParsersAction) -> None:
    p = top.add_parser(
        "merge", help="fold a LoRA adapter into its base: a merged HF checkpoint",
        description="Write BASE with the LoRA ADAPTER (PEFT format, e.g. skymoe export of a "
                    "LoRA run) folded into its weights, as an HF checkpoint directory in the "
                    "base's dtype (an FP8 base is widened to bf16), or re-quantized to FP8 "
                    "with --to fp8. The tokenizer and chat template come from ADAPTER when it has "
                    "them, else from BASE. Holds the model in memory once.")
    p.add_argument("base", metavar="BASE", help="the base checkpoint directory")
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter directory")
    p.add_argument("out_dir", metavar="OUT", help="output directory")
    p.add_argument("--to", choices=["fp8"],
                   help="fp8: write the FP8 convention of skymoe quantize (projections e4m3 "
                        "with per-tensor scales)")
    flags.add_output(p, shards=False)
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> None:
    """Write the merged checkpoint and say where."""
    out = merge_adapter(args.base, args.adapter, args.out_dir, to_fp8=args.to == "fp8",
                        overwrite=args.overwrite)
    print(f"wrote {out}" + (" (FP8)" if args.to == "fp8" else ""))


def _register_upcycle(top: argparse._SubParsersAction) -> None:
    p = top.add_parser(
        "upcycle", help="turn a dense Llama-format checkpoint into a Skywork-MoE",
        description="Write a Skywork-MoE checkpoint whose experts are copies of a dense "
                    "model's FFNs (attention, embeddings, norms and tokenizer copied; router "
                    "from a small random init or zeros). Streams shard by shard. With "
                    "--advise, print the report's upcycle-or-scratch rule for your budgets "
                    "instead.")
    p.add_argument("dense_dir", nargs="?", help="dense Llama-format HF checkpoint directory")
    p.add_argument("out_dir", nargs="?", help="output directory")
    p.add_argument("--experts", type=int, default=16, help="experts per MoE layer (default 16)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--interval", type=int, default=1,
                   help="every n-th layer becomes MoE (default 1: all)")
    p.add_argument("--router-init", choices=["random", "zeros"], default="random")
    p.add_argument("--router-std", type=float, default=0.02, help="random router std (0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed for router, noise, re-init")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="Gaussian noise on expert copies, relative to each weight's std")
    p.add_argument("--reinit-fraction", type=float, default=0.0,
                   help="Drop-Upcycling: fraction of each expert's FFN units re-initialized")
    p.add_argument("--no-logits-norm", action="store_true",
                   help="write moe_use_logits_norm=false (default: on)")
    p.add_argument("--gate-norm-std", type=float, default=1.0,
                   help="gating normalization lambda (default 1.0)")
    flags.add_output(p)
    p.add_argument("--advise", action="store_true",
                   help="print whether to upcycle or train from scratch (no files written)")
    p.add_argument("--dense-tokens", type=float, help="tokens the dense model was trained on")
    p.add_argument("--moe-tokens", type=float, help="tokens you can train the MoE on")
    p.add_argument("--dense-params", type=float,
                   help="dense non-embedding parameters (default: from DENSE_DIR)")
    p.set_defaults(func=cmd_upcycle)


def cmd_upcycle(args: argparse.Namespace) -> None:
    """Write the upcycled checkpoint (or, with ``--advise``, print the advice)."""

    if args.advise:
        _advise(args)
        return
    if not args.dense_dir or not args.out_dir:
        raise UsageError("give DENSE_DIR and OUT_DIR (or --advise)")
    opts = up.UpcycleOptions(
        num_experts=args.experts, top_k=args.top_k, interval=args.interval,
        router_init=args.router_init, router_std=args.router_std, seed=args.seed,
        noise_std=args.noise_std, reinit_fraction=args.reinit_fraction,
        use_logits_norm=not args.no_logits_norm, gate_norm_std=args.gate_norm_std,
        max_shard_bytes=parse_size(args.max_shard_size))
    out = up.upcycle(args.dense_dir, args.out_dir, opts, overwrite=args.overwrite)
    counts = parameter_counts(SkyworkMoeConfig.from_json_file(out))
    print(f"wrote {out}: {opts.num_experts} experts, top-{opts.top_k}, every {opts.interval} "
          f"layer(s); {format_count(counts['total'])} parameters, "
          f"{format_count(counts['active'])} active")
    print(f"train it with a fresh warmup + decay: skymoe train --set model.init_from={out}")


def _advise(args: argparse.Namespace) -> None:

    if args.dense_tokens is None or args.moe_tokens is None:
        raise UsageError("--advise needs --dense-tokens and --moe-tokens")
    if args.dense_params is None and not args.dense_dir:
        raise UsageError("--advise needs DENSE_DIR or --dense-params")
    dense = up.read_dense_config(Path(args.dense_dir)) if args.dense_dir else None
    dense_params = args.dense_params if args.dense_params is not None \
        else up.active_params(dense)
    # The upcycled model's active parameters: the dense ones plus (top_k - 1) FFNs per MoE
    # layer and the routers; without a checkpoint, top-2 of same-size experts is assumed.
    if dense is not None:
        moe_active = up.active_params(up.moe_config(dense, up.UpcycleOptions(
            num_experts=args.experts, top_k=args.top_k, interval=args.interval)))
        scale = moe_active / up.active_params(dense)
    else:
        scale = 1.0 + (args.top_k - 1) * 2 / 3  # FFN ~ 2/3 of a Llama layer's parameters
    advice = up.advise(dense_params, args.dense_tokens, dense_params * scale, args.moe_tokens)
    print("\n".join(advice.lines))
    print(f"advice: {advice.verdict}")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Write the FP8 checkpoint and print its size next to the input's."""

    out = quantize_checkpoint(args.in_dir, args.out_dir, overwrite=args.overwrite,
                              max_shard_bytes=parse_size(args.max_shard_size))
    before = sum(f.stat().st_size for f in Path(args.in_dir).glob("*.safetensors"))
    after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {after / 1e6:.1f} MB of safetensors"
          + (f" ({after / before:.2f}x the input's {before / 1e6:.1f} MB)" if before else ""))
