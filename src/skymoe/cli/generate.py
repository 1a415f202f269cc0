"""``skymoe generate`` (text from a prompt, streamed) and ``skymoe bench generate`` (offline
batched throughput of the engine)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tqdm import tqdm

from ..checkpoint import load_tokenizer
from ..config import resolve_config
from ..infer.engine import Engine, Request
from ..infer.tensor_parallel import inference_rank, prepare_inference
from ..model.transformer import build_model
from . import flags
from .flags import UsageError


def register(top: argparse._SubParsersAction) -> None:
    """Add ``generate``."""
    p = top.add_parser(
        "generate", help="generate text from a prompt (streams to the terminal)",
        description="Generate text with a KV cache, streaming tokens as they come. Greedy by "
                    "default (--temperature 0); stops at EOS.")
    flags.add_model(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    flags.add_sampling(p)
    flags.add_loading(p)
    flags.add_adapter(p)
    flags.add_tp(p, "one process each, under torchrun --nproc-per-node TP; heads split "
                    "unevenly, experts along the intermediate size")
    p.set_defaults(func=cmd_generate)


def register_bench(bench: argparse._SubParsersAction) -> None:
    """Add ``bench generate``."""
    p = bench.add_parser(
        "generate", help="offline batched generation throughput",
        description="Submit --num-prompts random prompts of --input-len tokens, each generating "
                    "exactly --output-len tokens, to the continuous-batching engine with up to "
                    "--max-batch in flight; report output tokens/s and total (prompt + output) "
                    "tokens/s.")
    flags.add_model(p, f"{flags.ANY_MODEL} (a preset or config.json: random weights)")
    flags.add_workload(p, "seed of the random prompts and a preset's random weights")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences generating at once (default 16)")
    flags.add_loading(p, dtype="bfloat16", threads=False,
                      why="a checkpoint and a preset's random weights are timed at one "
                          "precision")
    p.set_defaults(func=cmd_bench_generate)


def cmd_generate(args: argparse.Namespace) -> None:
    """Stream the prompt and its continuation to stdout, the speed to stderr."""

    params = flags.sampling_params(args)
    flags.require_positive(max_new_tokens=args.max_new_tokens, tp=args.tp)
    tokenizer = load_tokenizer(args.model)
    model = flags.load(args)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens; give a non-empty --prompt")
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} "
                         f"exceeds the model's context of {limit} positions")
    eos = (tokenizer.eos_id,) if tokenizer.eos_id is not None else model.config.eos_token_ids
    with inference_rank(model, args.tp) as rank:
        show = print if rank.is_main else lambda *_, **__: None  # rank 0 speaks for all
        show(args.prompt, end="", flush=True)
        engine = Engine(rank.model, tokenizer, max_batch=1,
                        max_len=len(ids) + args.max_new_tokens)
        engine.submit(Request(ids, args.max_new_tokens, rank.shared_sampling(params),
                              stop_token_ids=tuple(eos),
                              on_token=lambda _, __, text: show(text, end="", flush=True)))
        began = time.perf_counter()
        (done,) = engine.run()
        elapsed = time.perf_counter() - began
    n = len(done.token_ids)
    show()
    show(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s; prompt {len(ids)} tokens]",
         file=sys.stderr)


def cmd_bench_generate(args: argparse.Namespace) -> None:
    """Time the engine on random prompts and print requests/s and tokens/s."""

    flags.require_positive(num_prompts=args.num_prompts, input_len=args.input_len,
                           output_len=args.output_len, max_batch=args.max_batch)
    if Path(args.model).is_dir():
        model = flags.load(args)
    else:
        model = flags.lm_head(build_model(resolve_config(args.model),
                                          dtype=flags.DTYPES[args.dtype] or torch.bfloat16,
                                          seed=args.seed), args)
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
