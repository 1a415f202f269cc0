"""``skymoe eval``: perplexity on text, and agreement with a reference model."""

from __future__ import annotations

import argparse

from ..checkpoint import load_model, load_tokenizer
from ..infer.evaluate import evaluate, separator_id, token_stream
from ..kernels import load_kernels
from ..train import data, sources
from . import flags
from .flags import UsageError


def register(top: argparse._SubParsersAction) -> None:
    """Add ``eval``."""
    p = top.add_parser(
        "eval", help="perplexity, and KL / top-1 agreement vs a reference",
        description="Score a model on text: perplexity with the context length and scoring "
                    "rule printed; with --reference, KL divergence (mean, 99.9th percentile, "
                    "max) and top-1 agreement against that model on the same positions (e.g. "
                    "fp8 vs bf16).")
    flags.add_model(p, "HF checkpoint directory (with its tokenizer)")
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
    flags.add_loading(p, dtype="float32",
                      why="scores compare across checkpoints and with --reference (loaded "
                          "in it too) free of low-precision rounding")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    """Print the data, the scoring rule, the perplexity and (with a reference) KL / top-1."""

    if args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    tokenizer = load_tokenizer(args.model)
    model = flags.load(args)
    reference = (load_model(args.reference, dtype=flags.DTYPES[args.dtype])
                 if args.reference else None)
    for m in (model, reference):  # the fastest kernels for the scoring forwards
        if m is not None:
            m.use_kernels(load_kernels(m.device))
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"--reference has vocab_size {reference.config.vocab_size}, the model "
                         f"{model.config.vocab_size}: compare models that share a tokenizer")
    corpus = args.data or sources.default_corpus_sources()
    patterns = args.pattern or (["*"] if args.data else ["*.py"])
    docs = data.read_documents(corpus, patterns, args.text_field)
    stream = token_stream(docs, tokenizer, separator_id(tokenizer, model.config, args.model),
                          args.max_tokens)
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
