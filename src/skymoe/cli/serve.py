"""``skymoe serve`` (the OpenAI-compatible HTTP server) and ``skymoe bench serve`` (a load test
of such a server)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import load_tokenizer
from ..infer.engine import Engine
from ..infer.tensor_parallel import inference_rank
from ..units import parse_size
from . import flags
from .flags import UsageError

if TYPE_CHECKING:  # the server's modules load only when serving
    from ..serve.limits import RequestLimits


def register(top: argparse._SubParsersAction) -> None:
    """Add ``serve``."""
    p = top.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/models, "
                    "/v1/completions, /v1/chat/completions, /health, /metrics) on the "
                    "continuous-batching engine; see docs/serving.md. Tensor parallel: "
                    "torchrun --nproc-per-node N -m skymoe serve MODEL --tp N (rank 0 serves "
                    "HTTP, every rank steps the engine).")
    flags.add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    flags.add_api_key(p, "require 'Authorization: Bearer KEY' on every endpoint but /health "
                         "(default: $SKYMOE_API_KEY, else none)")
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
    flags.add_loading(p)
    flags.add_adapter(p)
    flags.add_tp(p, "one process each, under torchrun --nproc-per-node TP")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level; info logs every request (default info)")
    p.set_defaults(func=cmd_serve)


def register_bench(bench: argparse._SubParsersAction) -> None:
    """Add ``bench serve``."""
    p = bench.add_parser(
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
    flags.add_workload(p, "seed of the random prompts")
    flags.add_api_key(p, "API key (default: $SKYMOE_API_KEY)")
    p.add_argument("--vocab-size", type=int,
                   help="token ids for random prompts are below this (default: the server's "
                        "vocab_size from /v1/models)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (rank 0); under ``--tp`` the other ranks follow rank 0."""
    import signal

    from ..serve.engine_thread import Lockstep, run_worker
    from ..serve.server import serve

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    engine_limits = dict(max_batch=args.max_batch, max_queue=args.max_queue,
                         max_prefill_tokens=args.max_prefill_tokens)
    flags.require_positive(**engine_limits, tp=args.tp)
    limits = _request_limits(args)
    if not Path(args.model).is_dir():
        raise UsageError(f"{args.model}: not a checkpoint directory")
    tokenizer = load_tokenizer(args.model)
    model = flags.load(args)
    limit = model.config.max_position_embeddings
    max_model_len = args.max_model_len or limit
    if not 2 <= max_model_len <= limit:
        raise UsageError(f"--max-model-len must be between 2 and the model's context of "
                         f"{limit} tokens, got {max_model_len}")
    with inference_rank(model, args.tp) as rank:
        lockstep = Lockstep() if rank.tp > 1 else None
        if not rank.is_main:  # the other ranks step with rank 0's engine until it shuts down
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: rank 0 stops them all
            run_worker(Engine(rank.model, tokenizer, max_len=max_model_len, **engine_limits),
                       lockstep)
            return 0
        return serve(rank.model, tokenizer, flags.template_dir(args),
                     model_name=args.served_model_name or args.model, host=args.host,
                     port=args.port, api_key=flags.api_key(args), max_model_len=max_model_len,
                     log_level=args.log_level, lockstep=lockstep, limits=limits,
                     **engine_limits)


def _request_limits(args: argparse.Namespace) -> RequestLimits:
    """The per-request limits, checked before the model loads (a bad flag fails fast)."""
    from ..serve.limits import RequestLimits

    limits = RequestLimits(
        parse_size(args.max_request_bytes) if args.max_request_bytes else None,
        args.header_timeout, args.body_timeout)
    try:
        limits.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return limits


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Load-test the server at ``--url``; exit 1 when a request failed."""
    import asyncio

    from ..serve.bench import BenchError, format_result, run_bench

    flags.require_positive(concurrency=args.concurrency, num_prompts=args.num_prompts,
                           input_len=args.input_len, output_len=args.output_len)
    try:
        result = asyncio.run(run_bench(
            args.url, concurrency=args.concurrency, num_prompts=args.num_prompts,
            input_len=args.input_len, output_len=args.output_len, model=args.model,
            api_key=flags.api_key(args), seed=args.seed, vocab_size=args.vocab_size))
    except BenchError as exc:
        raise UsageError(str(exc)) from None
    print(result.to_json() if args.json else format_result(result))
    return 1 if result.failed else 0
