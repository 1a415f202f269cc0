"""The ``skymoe`` command: one entry point with subcommands.

Every subcommand validates its input and reports a bad one as a single line on stderr with exit
code 2 (1 for a failure while running); tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .config import SkyworkMoeConfig, format_count, parameter_counts, resolve_config
from .errors import ConfigError, SkymoeError, describe_os_error
from .checkpoint.fp8 import FP8_MODES
from .infer.planner import GPU_PRESETS
from .parallel.pipeline_cost import DEVICE_PRESETS
from .parallel.pipeline_planner import SCHEDULES as PIPELINE_SCHEDULES
from .units import parse_size

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


class UsageError(SkymoeError):
    """A command-line argument that cannot be used."""


# ------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint.io import tensor_infos

    config = resolve_config(args.path)
    c = config
    counts = parameter_counts(c)
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    rows = [
        ("model", f"{c.model_type}, {c.num_hidden_layers} layers "
                  f"({moe_layers} MoE, {c.num_hidden_layers - moe_layers} dense)"),
        ("attention", f"hidden {c.hidden_size}, heads {c.num_attention_heads} / kv "
                      f"{c.num_key_value_heads}, head dim {c.head_size}"),
        ("ffn", f"SwiGLU, intermediate {c.intermediate_size}"),
    ]
    if c.is_moe:
        norm = (f"on (lambda {c.moe_gate_norm_std})" if c.moe_use_logits_norm else "off")
        rows.append(("experts", f"{c.num_experts} per MoE layer, top-{c.num_experts_per_tok}, "
                                f"every {c.moe_expert_interval} layer(s); gating logit norm {norm}; "
                                f"{'2-layer' if c.moe_2layer_gate else '1-layer'} gate"
                                f"{'' if c.moe_feature_no_mul_topk else '; expert input x top-k'}"))
    rows += [
        ("vocab", f"{c.vocab_size} tokens, context {c.max_position_embeddings}, "
                  f"RoPE theta {c.rope_theta:g}, tied embeddings {c.tie_word_embeddings}"),
        ("parameters", f"total {format_count(counts['total'])} "
                       f"({counts['total']:,}); embeddings {format_count(counts['embedding'])}"),
        ("active/token", f"{format_count(counts['active'])} with embeddings, "
                         f"{format_count(counts['active_non_embedding'])} without"),
    ]
    path = Path(args.path)
    if path.is_dir():
        infos = tensor_infos(path)
        by_dtype: dict[str, list[int]] = {}
        for dtype, shape, _ in infos.values():
            numel = 1
            for s in shape:
                numel *= s
            entry = by_dtype.setdefault(str(dtype).replace("torch.", ""), [0, 0, 0])
            entry[0] += 1
            entry[1] += numel
            entry[2] += numel * torch.empty((), dtype=dtype).element_size()
        for name, (n, numel, nbytes) in sorted(by_dtype.items()):
            rows.append((f"weights {name}", f"{nbytes / 1e6:,.1f} MB in {n} tensors "
                                            f"({format_count(numel)} values)"))
        files = {f for _, _, f in infos.values()}
        rows.append(("files", f"{len(files)} weight file(s) in {path}"))
    else:
        rows.append(("bf16 size", f"{counts['total'] * 2 / 1e9:,.2f} GB (from the config)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


# ------------------------------------------------------------------------------------- init
def cmd_init(args: argparse.Namespace) -> None:
    from .checkpoint import save_byte_tokenizer, save_model
    from .checkpoint.tokenizer import BYTE_VOCAB_SIZE
    from .model import build_model

    config = resolve_config(args.config)
    out = Path(args.out)
    if config.vocab_size < BYTE_VOCAB_SIZE:
        raise UsageError(f"{args.config}: vocab_size {config.vocab_size} is too small for the "
                         f"byte-level tokenizer ({BYTE_VOCAB_SIZE} ids)")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"{out}: exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    dtype = _DTYPES[args.dtype] or config.dtype
    model = build_model(config, dtype=dtype, seed=args.seed)
    save_model(model, out)
    save_byte_tokenizer(out)
    total = parameter_counts(config)["total"]
    print(f"wrote a randomly initialized {config.model_type} model ({format_count(total)} "
          f"parameters, {str(dtype).replace('torch.', '')}, seed {args.seed}) to {out}")


# --------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_model, load_tokenizer
    from .infer import SamplingParams
    from .infer.engine import Engine, Request
    from .infer.tensor_parallel import inference_rank

    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.path)
    model = load_model(args.path, dtype=_DTYPES[args.dtype], fp8=args.fp8)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens; give a non-empty --prompt")
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} "
                         f"exceeds the model's context of {limit} positions")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else model.config.eos_token_ids
    with inference_rank(model, args.tp) as rank:
        params = rank.shared_sampling(params)
        if rank.is_main:
            print(args.prompt, end="", flush=True)

        def on_token(_, __: int, text: str) -> None:
            if rank.is_main:
                print(text, end="", flush=True)

        engine = Engine(rank.model, tokenizer, max_batch=1,
                        max_len=len(ids) + args.max_new_tokens)
        engine.submit(Request(ids, args.max_new_tokens, params, stop_token_ids=tuple(eos),
                              on_token=on_token))
        t0 = time.perf_counter()
        (done,) = engine.run()
        elapsed = time.perf_counter() - t0
    if rank.is_main:
        n = len(done.token_ids)
        print()
        print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s; prompt {len(ids)} "
              "tokens]", file=sys.stderr)


# ------------------------------------------------------------------------------------ serve
def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from .checkpoint import load_model, load_tokenizer
    from .infer.engine import Engine
    from .infer.tensor_parallel import inference_rank
    from .serve.engine_thread import Lockstep, run_worker
    from .serve.limits import RequestLimits
    from .serve.server import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("SKYMOE_API_KEY")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    for flag in ("max_batch", "max_queue", "max_prefill_tokens", "tp"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    limits = RequestLimits(
        parse_size(args.max_request_bytes) if args.max_request_bytes else None,
        args.header_timeout, args.body_timeout)
    try:
        limits.check()  # before the model loads
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not Path(args.model).is_dir():
        raise UsageError(f"{args.model}: not a checkpoint directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=_DTYPES[args.dtype], fp8=args.fp8)
    limit = model.config.max_position_embeddings
    max_model_len = args.max_model_len or limit
    if not 2 <= max_model_len <= limit:
        raise UsageError(f"--max-model-len must be between 2 and the model's context of "
                         f"{limit} tokens, got {max_model_len}")
    engine_limits = dict(max_batch=args.max_batch, max_queue=args.max_queue,
                         max_prefill_tokens=args.max_prefill_tokens)
    with inference_rank(model, args.tp) as rank:
        lockstep = Lockstep() if rank.tp > 1 else None
        if not rank.is_main:  # the other ranks step with rank 0's engine until it shuts down
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: rank 0 stops them all
            run_worker(Engine(rank.model, tokenizer, max_len=max_model_len, **engine_limits),
                       lockstep)
            return 0
        return serve(rank.model, tokenizer, args.model,
                     model_name=args.served_model_name or args.model, host=args.host,
                     port=args.port, api_key=api_key or None, max_model_len=max_model_len,
                     log_level=args.log_level, lockstep=lockstep, limits=limits,
                     **engine_limits)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .serve.bench import BenchError, format_result, run_bench

    for flag in ("concurrency", "num_prompts", "input_len", "output_len"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get("SKYMOE_API_KEY")
    try:
        result = asyncio.run(run_bench(
            args.url, concurrency=args.concurrency, num_prompts=args.num_prompts,
            input_len=args.input_len, output_len=args.output_len, model=args.model,
            api_key=api_key or None, seed=args.seed, vocab_size=args.vocab_size))
    except BenchError as exc:
        raise UsageError(str(exc)) from None
    print(result.to_json() if args.json else format_result(result))
    return 1 if result.failed else 0


# ------------------------------------------------------------------------------------ train
def cmd_train(args: argparse.Namespace) -> int:
    import signal

    from .train import config as train_config
    from .train.plots import plot_run
    from .train.trainer import Trainer

    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"run.dir={json.dumps(args.run_dir)}")  # a TOML string
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config_path = args.config
    if config_path is None and args.resume:
        # Resuming: the run's saved config, so the run continues as it was configured.
        saved = Path(train_config.load(None, overrides).run.dir) / "config.toml"
        config_path = saved if saved.is_file() else None
    cfg = train_config.load(config_path, overrides)
    trainer = Trainer(cfg, resume=args.resume)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if not trainer.is_main:  # under torchrun, rank 0 reports
        return 128 + trainer.stop_signal if summary.interrupted else 0
    plots = plot_run(summary.run_dir)
    where = summary.checkpoint or "(none)"
    print(f"checkpoint: {where}\nmetrics:    {summary.run_dir / 'metrics.jsonl'}\n"
          f"plots:      {plots[0].parent if plots else '(none)'}")
    if summary.interrupted:
        print(f"interrupted at step {summary.steps}; continue with: skymoe train --resume "
              f"--run-dir {summary.run_dir}", file=sys.stderr)
        return 128 + (trainer.stop_signal or signal.SIGINT)
    if summary.val_loss is not None:
        print(f"final validation loss {summary.val_loss:.3f} "
              f"(perplexity {math.exp(min(summary.val_loss, 50)):.1f})")
    if trainer.mesh.world_size == 1:  # sharded logits need the serving engine's gather
        print(f"sample: {trainer.sample()!r}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> None:
    from . import upcycle as up

    if args.advise:
        _advise(args, up)
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


def _advise(args: argparse.Namespace, up) -> None:
    if args.dense_tokens is None or args.moe_tokens is None:
        raise UsageError("--advise needs --dense-tokens and --moe-tokens")
    if args.dense_params is not None:
        dense_params = args.dense_params
    elif args.dense_dir:
        dense_params = up.active_params(up.read_dense_config(Path(args.dense_dir)))
    else:
        raise UsageError("--advise needs DENSE_DIR or --dense-params")
    # The upcycled model's active parameters: the dense ones plus (top_k - 1) FFNs per MoE
    # layer and the routers; without a checkpoint, top-2 of same-size experts is assumed.
    if args.dense_dir:
        dense = up.read_dense_config(Path(args.dense_dir))
        moe_active = up.active_params(up.moe_config(dense, up.UpcycleOptions(
            num_experts=args.experts, top_k=args.top_k, interval=args.interval)))
        scale = moe_active / up.active_params(dense)
    else:
        scale = 1.0 + (args.top_k - 1) * 2 / 3  # FFN ~ 2/3 of a Llama layer's parameters
    advice = up.advise(dense_params, args.dense_tokens, dense_params * scale, args.moe_tokens)
    print("\n".join(advice.lines))
    print(f"advice: {advice.verdict}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skymoe", description="Skywork-MoE models: inspect, create and run them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="architecture, parameter counts and weight sizes",
                       description="Show the architecture, total and active parameters and the "
                                   "bytes per dtype of a checkpoint directory, a config.json or "
                                   "a preset (tiny, bench, skywork-moe-base).")
    p.add_argument("path", help="checkpoint directory, config.json or preset name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="create a randomly initialized model from a config",
                       description="Write a randomly initialized model (HF format, safetensors) "
                                   "with a byte-level tokenizer, for trying things out.")
    p.add_argument("out", help="output directory")
    p.add_argument("--config", required=True,
                   help="config.json path or preset name (tiny, bench, skywork-moe-base)")
    p.add_argument("--seed", type=int, default=0, help="initialization seed (default 0)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="auto",
                   help="weight dtype (default: the config's torch_dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)",
                       description="Generate text with a KV cache, streaming tokens as they "
                                   "come. Greedy by default (--temperature 0); stops at EOS.")
    p.add_argument("path", help="checkpoint directory (with tokenizer.json or tokenizer.model)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for reproducible output")
    p.add_argument("--dtype", choices=list(_DTYPES), default="auto",
                   help="compute dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--fp8", choices=FP8_MODES, default="auto", help=FP8_HELP)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel processes (run under torchrun --nproc-per-node TP); "
                        "heads split unevenly, experts along the intermediate size")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/models, "
                    "/v1/completions, /v1/chat/completions, /health, /metrics) on the "
                    "continuous-batching engine; see docs/serving.md. Tensor parallel: "
                    "torchrun --nproc-per-node N -m skymoe serve MODEL --tp N (rank 0 serves "
                    "HTTP, every rank steps the engine).")
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint directory (with tokenizer.json or tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint "
                                     "but /health (default: $SKYMOE_API_KEY, else none)")
    p.add_argument("--served-model-name",
                   help="the model id clients send and /v1/models lists (default: MODEL as "
                        "given)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences generating at once (KV-cache slots; default 16)")
    p.add_argument("--max-model-len", type=int,
                   help="positions per sequence, prompt + output (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting for a slot before requests get 429 (default 256)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="prompt tokens prefilled per engine step, first come first served; "
                        "longer prompts continue over the next steps, between decode steps "
                        "(default 2048)")
    p.add_argument("--max-request-bytes", metavar="SIZE",
                   help="largest request body, e.g. 4MiB; larger ones get 413 before they are "
                        "read (default: 64 full-context prompts as token ids, at least 1 MiB)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a connection that has not sent a request's headers within this time "
                        "is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body not received within this time after its headers gets "
                        "408 (default 30)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="auto",
                   help="compute dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--fp8", choices=FP8_MODES, default="auto", help=FP8_HELP)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel processes (run under torchrun --nproc-per-node TP)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level; info logs every request (default info)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train a Skywork-MoE model (default: a small one on the "
                                     "Python standard library's source)",
                       description="Train with Skywork-MoE's techniques: gating logit "
                                   "normalization, capacity and token dropping, the aux balance "
                                   "loss with per-layer adaptive coefficients. Settings come from "
                                   "a TOML file (sections model, data, tokenizer, train, moe, "
                                   "parallel, run; see docs/training.md) and --set overrides; "
                                   "with none, the embedded default runs. Ctrl-C saves a "
                                   "checkpoint and stops. Several processes: torchrun "
                                   "--nproc-per-node N -m skymoe train --set parallel.tp=2 "
                                   "--set parallel.expert=edp (docs/distributed.md).")
    p.add_argument("config", nargs="?", help="TOML config file (optional)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="run directory (same as --set run.dir=...)")
    p.add_argument("--steps", type=int, help="train up to this step (same as --set train.steps=N)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("upcycle", help="turn a dense Llama-format checkpoint into a Skywork-MoE",
                       description="Write a Skywork-MoE checkpoint whose experts are copies of "
                                   "a dense model's FFNs (attention, embeddings, norms and "
                                   "tokenizer copied; router from a small random init or zeros). "
                                   "Streams shard by shard. With --advise, print the report's "
                                   "upcycle-or-scratch rule for your budgets instead.")
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
    p.add_argument("--max-shard-size", default="5GB", help="output shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--advise", action="store_true",
                   help="print whether to upcycle or train from scratch (no files written)")
    p.add_argument("--dense-tokens", type=float, help="tokens the dense model was trained on")
    p.add_argument("--moe-tokens", type=float, help="tokens you can train the MoE on")
    p.add_argument("--dense-params", type=float,
                   help="dense non-embedding parameters (default: from DENSE_DIR)")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("plot", help="plot a run's metrics (loss, drop rate, coefficients, ...)",
                       description="Write PNG plots of a training run's metrics.jsonl: loss, "
                                   "per-layer drop rate and aux coefficients (heatmaps and "
                                   "curves), gate sharpness and expert load.")
    p.add_argument("run_dir", help="training run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("quantize", help="write an FP8 checkpoint (vLLM / Skywork-MoE-FP8 "
                                        "convention)",
                       description="Quantize an HF checkpoint to FP8: attention, expert and MLP "
                                   "projections become float8_e4m3fn with one fp32 weight_scale "
                                   "per tensor (per expert per matrix); router, embeddings, LM "
                                   "head and norms stay as they are; config.json gets "
                                   "quantization_config {quant_method: fp8, activation_scheme: "
                                   "dynamic}. Streamed tensor by tensor.")
    p.add_argument("in_dir", help="HF checkpoint directory (bf16 or fp32)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--fp8", action="store_true", required=True,
                   help="FP8 e4m3 with per-tensor scales (the only format so far)")
    p.add_argument("--max-shard-size", default="5GB", help="output shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity, and KL / top-1 agreement vs a reference",
                       description="Score a model on text: perplexity with the context length "
                                   "and scoring rule printed; with --reference, KL divergence "
                                   "(mean, 99.9th percentile, max) and top-1 agreement against "
                                   "that model on the same positions (e.g. fp8 vs bf16).")
    p.add_argument("model", help="HF checkpoint directory (with its tokenizer)")
    p.add_argument("--data", nargs="+", help="text/JSONL/Parquet files or directories "
                                             "(default: the Python standard library source)")
    p.add_argument("--pattern", action="append", help="file-name glob inside directories")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column")
    p.add_argument("--reference", help="reference model directory for KL and top-1 agreement")
    p.add_argument("--context", type=int, default=512, help="window length (default 512)")
    p.add_argument("--stride", type=int,
                   help="window advance, 1 to context-1 (default: half the context)")
    p.add_argument("--max-tokens", type=int, default=32768,
                   help="score at most this many tokens (default 32768)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--fp8", choices=FP8_MODES, default="auto", help=FP8_HELP)
    p.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks (generate, serve)",
                           description="Throughput benchmarks of skymoe itself.")
    bench_sub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = bench_sub.add_parser(
        "generate", help="offline batched generation throughput",
        description="Submit --num-prompts random prompts of --input-len tokens, each generating "
                    "exactly --output-len tokens, to the continuous-batching engine with up to "
                    "--max-batch in flight; report output tokens/s and total (prompt + output) "
                    "tokens/s.")
    p.add_argument("model", help="HF checkpoint directory or a preset (random weights)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--fp8", choices=FP8_MODES, default="auto", help=FP8_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_generate)

    p = bench_sub.add_parser(
        "serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, tok/s)",
        description="Send --num-prompts streaming /v1/completions requests with random "
                    "prompts of exactly --input-len token ids, each generating exactly "
                    "--output-len tokens (ignore_eos), at most --concurrency in flight; report "
                    "TTFT, TPOT, ITL and end-to-end latency (mean, median, p99), requests/s, "
                    "output and total tokens/s with vLLM benchmark_serving's definitions "
                    "(docs/serving.md).")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("--model", help="model id (default: the first one /v1/models lists)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests (default 32)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--output-len", type=int, default=32, help="output tokens (default 32)")
    p.add_argument("--api-key", help="API key (default: $SKYMOE_API_KEY)")
    p.add_argument("--vocab-size", type=int,
                   help="token ids for random prompts are below this (default: the server's "
                        "vocab_size from /v1/models)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench_serve)

    plan = sub.add_parser("plan", help="plan a deployment (pipeline, serve)",
                          description="Planners computed from a model config alone.")
    plan_sub = plan.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = plan_sub.add_parser(
        "serve", help="does a model fit on N GPUs with tensor parallelism, and how fast?",
        description="Weights and KV-cache capacity per rank under non-uniform tensor "
                    "parallelism (first heads %% N ranks take one extra head, experts split "
                    "along the intermediate size, vocab padded to a multiple of 24), whether it "
                    "fits, and a memory-bandwidth estimate of decode throughput vs batch size.")
    p.add_argument("--model", required=True,
                   help="preset name (e.g. skywork-moe-base), config.json or checkpoint dir")
    p.add_argument("--gpus", type=int, required=True, help="tensor-parallel GPUs")
    p.add_argument("--gpu", choices=sorted(GPU_PRESETS), default="4090",
                   help="GPU preset for memory and bandwidths (default 4090)")
    p.add_argument("--gpu-mem", help="GPU memory, e.g. 24GiB (overrides the preset)")
    p.add_argument("--bandwidth", type=float, help="GPU memory bandwidth in GB/s")
    p.add_argument("--link-bandwidth", type=float, help="GPU-to-GPU bandwidth in GB/s")
    p.add_argument("--reserve", default="1.5GiB",
                   help="memory per GPU kept for context/activations (default 1.5GiB)")
    p.add_argument("--dtype", default="fp8", help="weight dtype: fp8 (default), bf16, fp16")
    p.add_argument("--kv-dtype", default="bf16", help="KV cache dtype (default bf16)")
    p.add_argument("--context", type=int, default=1024,
                   help="average cached tokens per sequence for the estimate (default 1024)")
    p.set_defaults(func=cmd_plan_serve)

    p = plan_sub.add_parser(
        "pipeline", help="layers and recomputed layers per pipeline stage for training",
        description="Choose decoder layers per pipeline stage and how many of them recompute "
                    "their activations, minimizing the simulated step time of the 1f1b, "
                    "gpipe or interleaved-1f1b schedule while every rank fits in memory (the "
                    "first stage also runs the embedding and holds the most micro-batches in "
                    "flight, the last "
                    "runs the LM head and loss). Costs come from the config (analytical: FLOPs "
                    "at a GPU preset's sustained rate, saved-tensor byte formulas) or from "
                    "timing the model's layers on this machine's CPU (measured). With --layout, "
                    "evaluate that layout instead.")
    p.add_argument("model", metavar="MODEL",
                   help="preset name (e.g. skywork-moe-base), config.json or checkpoint dir")
    p.add_argument("--stages", type=int,
                   help="pipeline ranks P, one stage each unless --stages-per-rank (required "
                        "unless --layout gives them)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="sequences per micro-batch (default 1)")
    p.add_argument("--micro-batches", type=int,
                   help="micro-batches per step on each pipeline (default 4 x stages)")
    p.add_argument("--schedule", choices=PIPELINE_SCHEDULES, default="1f1b",
                   help="pipeline schedule (default 1f1b)")
    p.add_argument("--stages-per-rank", type=int, default=1,
                   help="stages V on each pipeline rank: the layout has P x V stages, rank r "
                        "holding r, r + P, ... (default 1; interleaved-1f1b needs >= 2)")
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
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (analytical)")
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
    return parser


def cmd_quantize(args: argparse.Namespace) -> None:
    from .quantize import quantize_checkpoint

    out = quantize_checkpoint(args.in_dir, args.out_dir, overwrite=args.overwrite,
                              max_shard_bytes=parse_size(args.max_shard_size))
    before = sum(f.stat().st_size for f in Path(args.in_dir).glob("*.safetensors"))
    after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {after / 1e6:.1f} MB of safetensors"
          + (f" ({after / before:.2f}x the input's {before / 1e6:.1f} MB)" if before else ""))


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import load_model, load_tokenizer
    from .infer.evaluate import evaluate, separator_id, token_stream
    from .train import data

    if args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, fp8=args.fp8)
    reference = load_model(args.reference, dtype=dtype) if args.reference else None
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"--reference has vocab_size {reference.config.vocab_size}, the model "
                         f"{model.config.vocab_size}: compare models that share a tokenizer")
    sources = args.data or data.default_corpus_sources()
    patterns = args.pattern or (["*"] if args.data else ["*.py"])
    docs = data.read_documents(sources, patterns, args.text_field)
    eos = separator_id(tokenizer, model.config, args.model)
    stream = token_stream(docs, tokenizer, eos, args.max_tokens)
    context = min(args.context, model.config.max_position_embeddings)
    stride = args.stride or context // 2
    where = ", ".join(map(str, args.data)) if args.data else "the Python standard library source"
    print(f"data: {where}: {len(stream):,} tokens (documents joined with EOS)")
    print(f"scoring: windows of {context} tokens advancing by {stride}; every token after the "
          f"first predicted once, from at least {context - stride} tokens of context after the "
          f"first window; weights in {args.dtype}")
    result = evaluate(model, stream, context, stride, reference, progress=True)
    print(f"perplexity {result.perplexity:.3f} (mean NLL {result.nll:.4f} nats/token over "
          f"{result.tokens_scored:,} tokens)")
    if reference is not None:
        print(f"vs reference {args.reference}: KL(reference || model) mean {result.kl_mean:.3e}, "
              f"p99.9 {result.kl_p999:.3e}, max {result.kl_max:.3e} nats/token; top-1 "
              f"agreement {100 * result.top1_agreement:.2f}%")


def cmd_bench_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .checkpoint import load_model
    from .infer.engine import Engine, Request
    from .infer.tensor_parallel import prepare_inference
    from .model.transformer import build_model

    for flag in ("num_prompts", "input_len", "output_len", "max_batch"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    dtype = _DTYPES[args.dtype]
    if Path(args.model).is_dir():
        model = load_model(args.model, dtype=dtype, fp8=args.fp8)
    else:
        model = build_model(resolve_config(args.model), dtype=dtype or torch.bfloat16,
                            seed=args.seed)
    model = prepare_inference(model.eval()).model
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(model.config.vocab_size, (args.num_prompts, args.input_len),
                            generator=gen).tolist()
    engine = Engine(model, max_batch=args.max_batch, max_len=args.input_len + args.output_len,
                    max_queue=args.num_prompts)
    for prompt in prompts:  # no stop tokens: every request runs to --output-len
        engine.submit(Request(prompt, args.output_len))
    began = time.perf_counter()
    with tqdm(total=args.num_prompts, desc="bench", unit="req") as bar:
        while engine.has_work:
            bar.update(len(engine.step()))
    elapsed = time.perf_counter() - began
    out_tokens = args.num_prompts * args.output_len
    total = out_tokens + args.num_prompts * args.input_len
    print(f"{args.num_prompts} requests x ({args.input_len} prompt + {args.output_len} output "
          f"tokens), up to {args.max_batch} in flight, {args.dtype}: {elapsed:.2f} s")
    print(f"requests/s {args.num_prompts / elapsed:.2f}; output tokens/s "
          f"{out_tokens / elapsed:.1f}; total (prompt + output) tokens/s {total / elapsed:.1f}")


FP8_HELP = ("FP8 checkpoints: auto (FP8 modules; FP8 matmuls on sm_89+ GPUs), keep (one byte "
            "per weight in memory), dequantize (plain weights)")


def cmd_plan_serve(args: argparse.Namespace) -> None:
    import dataclasses

    from .infer.planner import format_plan, plan_serve

    gpu = GPU_PRESETS[args.gpu]
    changes = {"reserve": parse_size(args.reserve)}
    if args.gpu_mem:
        changes["memory"] = parse_size(args.gpu_mem)
    for flag, key in ((args.bandwidth, "bandwidth"), (args.link_bandwidth, "link_bandwidth")):
        if flag is not None:
            if not (flag > 0 and math.isfinite(flag)):
                raise ConfigError(f"--{key.replace('_', '-')} must be a positive number of GB/s")
            changes[key] = flag * 1e9
    plan = plan_serve(resolve_config(args.model), args.gpus, dataclasses.replace(gpu, **changes),
                      args.dtype, args.kv_dtype, args.context)
    print(format_plan(plan))


def cmd_plan_pipeline(args: argparse.Namespace) -> None:
    from .parallel.pipeline_cost import analytical_profile, measure_profile
    from .parallel.pipeline_layout import PipelineLayout
    from .parallel.pipeline_planner import evaluate_layout, format_plan, plan_pipeline

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
    if args.schedule == "interleaved-1f1b" and per_rank < 2:
        raise UsageError("--schedule interleaved-1f1b runs several stages per pipeline rank; "
                         "give --stages-per-rank 2 or more (or use --schedule 1f1b)")
    if args.schedule != "interleaved-1f1b" and per_rank != 1:
        raise UsageError(f"--schedule {args.schedule} runs one stage per pipeline rank; "
                         "--stages-per-rank > 1 needs --schedule interleaved-1f1b")
    if layout is not None:
        if layout.stages % per_rank or (args.stages is not None
                                        and args.stages * per_rank != layout.stages):
            ranks = f"--stages {args.stages}" if args.stages is not None else "P"
            raise UsageError(f"--layout {args.layout} has {layout.stages} stages but needs "
                             f"{ranks} x --stages-per-rank {per_rank} counts (one per stage)")
    stages = (args.stages if args.stages is not None
              else (layout.stages // per_rank if layout else None))
    if stages is None:
        raise UsageError("--stages is required (or give a --layout)")
    micro_batches = args.micro_batches if args.micro_batches is not None else 4 * stages
    for flag, value in (("stages", stages), ("seq-len", args.seq_len),
                        ("micro-batch-size", args.micro_batch_size),
                        ("micro-batches", micro_batches), ("tp", args.tp), ("ep", args.ep),
                        ("dp", args.dp), ("repeats", args.repeats),
                        ("threads", 1 if args.threads is None else args.threads)):
        if value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
    config = resolve_config(args.model)
    if layout is not None:
        layout.validate(config.num_hidden_layers, stages * per_rank)
    device = DEVICE_PRESETS[args.device_preset]
    memory = parse_size(args.memory) if args.memory else device.usable_memory
    if args.profile == "analytical":
        if args.precision != "bf16":
            raise UsageError("the analytical profile models bf16 autocast training; use "
                             "--profile measured for --precision fp32")
        profile = analytical_profile(config, args.seq_len, args.micro_batch_size, device,
                                     tp=args.tp, ep=args.ep, dp=args.dp, zero=not args.no_zero)
    else:
        if args.tp > 1 or args.ep > 1:
            raise UsageError("--tp and --ep apply to the analytical profile; the measured one "
                             "runs whole layers on this machine")
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // stages))
        profile = measure_profile(config, args.seq_len, args.micro_batch_size, args.precision,
                                  repeats=args.repeats, dp=args.dp, zero=not args.no_zero)
    if layout is not None:
        plan = evaluate_layout(layout, profile, micro_batches, memory, args.schedule, per_rank)
    else:
        plan = plan_pipeline(profile, stages, micro_batches, memory, args.schedule, per_rank)
    print(format_plan(plan))
    print(f"train config: [parallel] pp = {stages}, "
          + (f"pp_stages_per_rank = {per_rank}, " if per_rank > 1 else "")
          + f"pp_layers = \"{','.join(map(str, plan.layout.layers))}\", pp_recompute = "
          f"\"{','.join(map(str, plan.layout.recompute))}\", pp_schedule = \"{args.schedule}\"")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except SkymoeError as exc:
        print(f"skymoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable path, a file in the way, a full disk
        print(f"skymoe {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"skymoe {args.command}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
