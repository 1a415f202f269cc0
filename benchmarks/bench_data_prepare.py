"""``skymoe data prepare`` vs Hugging Face ``datasets`` (``load_dataset("json")`` +
``map(batched=True)``) on generated JSONL corpora of two sizes, the same tokenizer and the same
number of workers.

The corpora are documents of 100 to 4,000 pseudo-words (a Zipf-like draw from 20,000 generated
words, with punctuation and paragraph breaks): one word list for all corpora, the documents
seeded by the corpus's position in ``--sizes``, so every corpus has the same statistics and
only its size differs; the tokenizer is a byte-level BPE of 8,192 tokens trained
(``train_bpe_tokenizer``) on the first 20 MB of the first corpus. Each side
runs in a fresh process: skymoe with ``--threads`` tokenizer threads, ``datasets`` with
``num_proc`` = the same number of processes (``TOKENIZERS_PARALLELISM=false`` in them, the usual
setting under multiprocessing), calling the tokenizer's ``encode_batch`` (what transformers'
fast tokenizers call) and, as a third side, ``encode_batch_fast`` (no character offsets, which
skymoe uses). Reported: wall time, tokens/s, and peak RSS (the process's own;
for ``datasets`` also its largest worker's), plus the ratio of throughputs. ``datasets`` is
timed both from the JSONL file (its JSON-to-Arrow conversion included, what a user runs) and
for the ``map`` alone.

Usage: python benchmarks/bench_data_prepare.py [--sizes 0.5,2] [--workers 2] [--dir D]
       [--keep] [--json F]   (needs: pip install datasets)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GB = 10**9
SIDES = ("skymoe", "datasets", "datasets-fast")


def _words(gen: np.random.Generator, n: int) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = np.linspace(2.0, 0.2, len(letters))
    lengths = gen.integers(2, 11, size=n)
    return np.array(["".join(gen.choice(letters, size=k, p=weights / weights.sum()))
                     for k in lengths])


def generate_corpus(path: Path, size_bytes: int, seed: int) -> None:
    """JSONL documents of pseudo-words up to ``size_bytes``: the same word list whatever the
    seed, the documents drawn from ``seed``."""
    vocab = _words(np.random.default_rng(0), 20_000)
    gen = np.random.default_rng([1, seed])
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    punct = np.array(["", "", "", "", ",", ".", ".\n\n"])
    written = 0
    with open(path, "w") as f:
        while written < size_bytes:
            block = []
            for _ in range(200):
                n = int(gen.integers(100, 4000))
                words = vocab[gen.choice(len(vocab), size=n, p=zipf)]
                marks = punct[gen.integers(0, len(punct), size=n)]
                text = " ".join(np.char.add(words, marks).tolist())
                block.append(json.dumps({"text": text}) + "\n")
            chunk = "".join(block)
            f.write(chunk)
            written += len(chunk)


def _peak_rss_mib() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def worker_skymoe(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    from skymoe.train.prepare import prepare_dataset

    began = time.perf_counter()
    report = prepare_dataset([corpus], tokenizer, out, val_fraction=0.0, show_progress=False)
    seconds = time.perf_counter() - began
    own, _ = _peak_rss_mib()
    # Tokens without the EOS after each document, as the other side counts them.
    tokens = report.tokens["train"] - report.documents["train"]
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mib": own}


def worker_datasets(corpus: Path, tokenizer: Path, out: Path, workers: int,
                    fast: bool = False) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from datasets import disable_progress_bars, load_dataset
    from tokenizers import Tokenizer

    disable_progress_bars()
    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))

    batch_encode = tok.encode_batch_fast if fast else tok.encode_batch

    def encode(batch: dict) -> dict:
        return {"input_ids": [e.ids for e in batch_encode(batch["text"],
                                                          add_special_tokens=False)]}

    began = time.perf_counter()
    ds = load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(out))
    loaded = time.perf_counter()
    mapped = ds.map(encode, batched=True, num_proc=workers, remove_columns=["text"])
    done = time.perf_counter()
    tokens = sum(len(ids) for part in mapped.iter(batch_size=10_000)
                 for ids in part["input_ids"])
    own, children = _peak_rss_mib()
    return {"seconds": done - began, "map_seconds": done - loaded, "tokens": tokens,
            "peak_rss_mib": own, "worker_peak_rss_mib": children}


def _run_worker(side: str, corpus: Path, tokenizer: Path, out: Path, workers: int,
                keep: Path | None = None) -> dict:
    """Run one side in a fresh process; its output is removed, or moved to ``keep``."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--worker", side, "--corpus", str(corpus),
           "--tokenizer", str(tokenizer), "--out", str(out), "--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        out.rename(keep)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.5,2", help="corpus sizes in GB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/skymoe-bench-prepare")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep", action="store_true",
                        help="keep skymoe's outputs as DIR/prepared-<size>GB (for "
                             "bench_prepared_training.py)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        paths = Path(args.corpus), Path(args.tokenizer), Path(args.out)
        if args.worker == "skymoe":
            result = worker_skymoe(*paths, args.workers)
        else:
            result = worker_datasets(*paths, args.workers, fast=args.worker == "datasets-fast")
        print(json.dumps(result))
        return

    from skymoe.train.bpe import train_bpe_tokenizer

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",")]
    corpora = {}
    for i, size in enumerate(sizes):
        path = root / f"corpus-{size:g}GB.jsonl"
        if not path.is_file():
            print(f"generating {path} ...", file=sys.stderr)
            generate_corpus(path, int(size * GB), seed=i)
        corpora[size] = path
    tokenizer = root / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        sample = []
        with open(corpora[sizes[0]]) as f:
            for line in f:
                sample.append(json.loads(line)["text"])
                if sum(map(len, sample)) >= 20 * 2**20:
                    break
        train_bpe_tokenizer(sample, 8192, tokenizer)
    results = []
    for size, corpus in corpora.items():
        for side in SIDES:
            print(f"{side} on {corpus.name} ...", file=sys.stderr)
            keep = root / f"prepared-{size:g}GB" if args.keep and side == "skymoe" else None
            r = _run_worker(side, corpus, tokenizer, root / f"out-{side}", args.workers, keep)
            r.update(side=side, corpus_gb=size, corpus_bytes=corpus.stat().st_size,
                     tokens_per_s=r["tokens"] / r["seconds"])
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    print("| corpus | side | wall s | tokens | tokens/s | peak RSS MiB |\n"
          "|---|---|---:|---:|---:|---:|")
    for r in results:
        rss = f"{r['peak_rss_mib']:,.0f}"
        if "worker_peak_rss_mib" in r:
            rss += f" (+ workers {r['worker_peak_rss_mib']:,.0f} each)"
        extra = f" (map alone {r['map_seconds']:.1f})" if "map_seconds" in r else ""
        print(f"| {r['corpus_gb']:g} GB | {r['side']} | {r['seconds']:.1f}{extra} | "
              f"{r['tokens']:,} | {r['tokens_per_s']:,.0f} | {rss} |")
    for size in sizes:
        ours, theirs, fast = (next(r for r in results if r["corpus_gb"] == size
                                   and r["side"] == s) for s in SIDES)
        print(f"{size:g} GB: skymoe / datasets throughput = "
              f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x (vs its map alone "
              f"{ours['tokens_per_s'] / (theirs['tokens'] / theirs['map_seconds']):.2f}x); "
              f"/ datasets with encode_batch_fast = "
              f"{ours['tokens_per_s'] / fast['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"workers": args.workers, "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
