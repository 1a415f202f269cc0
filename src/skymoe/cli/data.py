"""``skymoe data prepare``: tokenize a corpus once into memory-mapped token shards."""

from __future__ import annotations

import argparse
import os

from ..train.prepare import prepare_dataset
from ..train.sft_example import write_samples
from . import flags


def register(top: argparse._SubParsersAction) -> None:
    """Add ``data prepare`` and ``data sft-example``."""
    data = top.add_parser("data", help="prepare training data (tokenize once; the SFT example)",
                          description="Training data tools.")
    commands = data.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = commands.add_parser(
        "prepare", help="tokenize a corpus into memory-mapped token shards",
        description="Read text files, directories, JSONL and Parquet as a stream, tokenize "
                    "them in batches with the tokenizer library's own threads and write "
                    "token shards (uint16 when the vocabulary fits, else uint32) with "
                    "document boundaries, a train/validation split by document and "
                    "meta.json; training reads them with data.prepared = [\"OUT\"]. Memory "
                    "stays bounded whatever the corpus size; an interrupted prepare leaves "
                    "no output.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="text/JSONL/Parquet files or directories")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="directory with tokenizer.json or tokenizer.model (a checkpoint's, "
                        "or a run's RUN_DIR/tokenizer)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (must not exist)")
    p.add_argument("--pattern", action="append",
                   help="file-name glob inside directories (repeatable; default: every file)")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column "
                                                         "(default text)")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents held out for validation (default 0.005)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the validation split (default 0)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad input (non-UTF-8 files, broken JSON lines, missing "
                        "fields) and count it, instead of stopping at the first")
    p.add_argument("--shard-tokens", type=int, default=2**28,
                   help="tokens per shard, ended at a document boundary (default 2^28)")
    p.add_argument("--threads", type=int, default=0,
                   help="tokenizer threads (default: every core)")
    p.set_defaults(func=cmd_prepare)
    p = commands.add_parser(
        "sft-example", help="write the embedded fine-tuning example's chat samples",
        description="Write chat samples (JSONL, {\"messages\": [...]}) built from the Python "
                    "standard library: the user asks for a documented function by name, "
                    "module and the docstring's first paragraph; the assistant answers with "
                    "its code. Nothing is downloaded; the same Python gives the same samples.")
    p.add_argument("out", metavar="OUT", help="output JSONL file")
    p.add_argument("--max-chars", type=int, default=400,
                   help="leave out functions whose code is longer (default 400)")
    p.add_argument("--limit", type=int, default=0, help="at most this many samples (0: all)")
    p.set_defaults(func=cmd_sft_example)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Prepare and report what was written."""
    flags.require_positive(shard_tokens=args.shard_tokens)
    if args.threads:  # read by the tokenizers library when its thread pool starts
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    report = prepare_dataset(args.sources, args.tokenizer, args.out,
                             patterns=args.pattern or ["*"], text_field=args.text_field,
                             val_fraction=args.val_fraction, seed=args.seed,
                             skip_bad=args.skip_bad, shard_tokens=args.shard_tokens)
    rate = sum(report.tokens.values()) / max(report.seconds, 1e-9)
    print(f"wrote {report.directory}: {report.tokens['train']:,} training tokens in "
          f"{report.documents['train']:,} documents, {report.tokens['val']:,} validation "
          f"tokens in {report.documents['val']:,}; read {report.bytes_read / 1e6:.1f} MB in "
          f"{report.seconds:.1f} s ({rate:,.0f} tokens/s)")
    if report.skipped_count:
        print(f"skipped {report.skipped_count} bad input(s); the first:")
        for message in report.skipped:
            print(f"  {message}")


def cmd_sft_example(args: argparse.Namespace) -> None:
    """Write the samples and say how many."""
    flags.require_positive(max_chars=args.max_chars)
    n = write_samples(args.out, args.max_chars, args.limit)
    print(f"wrote {n} chat samples to {args.out}")
