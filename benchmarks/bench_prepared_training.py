"""Training from prepared (memory-mapped) data vs the in-memory corpus: per-rank peak RSS and
training tokens/s under 2 data-parallel processes.

Cases: the in-memory path (``data.sources``: a JSONL corpus read, tokenized and packed at
start-up on every rank) on a small corpus, and ``data.prepared`` on directories written by
``skymoe data prepare`` of different sizes (``bench_data_prepare.py --keep`` leaves them). Each
case trains the ``tiny`` preset (vocabulary from the tokenizer) for ``--steps`` steps of 16
sequences of 256 tokens, DP 2 under torchrun, no evaluation; reported per case: every rank's
peak RSS (``ru_maxrss`` at the end of training) and the median training tokens/s of the steps
after the first 5 (from the run's metrics.jsonl).

Usage: python benchmarks/bench_prepared_training.py --tokenizer DIR --memory CORPUS.jsonl
       --prepared DIR [DIR ...] [--steps 40] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def rank_worker(args: argparse.Namespace) -> None:
    """One torchrun rank: train, then append this rank's peak RSS to ``--report``."""
    import torch.distributed as dist

    from skymoe.train import config as train_config
    from skymoe.train.trainer import Trainer

    data = ({"prepared": [args.case]} if Path(args.case).is_dir()
            else {"sources": [args.case], "val_fraction": 0.0})
    cfg = train_config.from_dict({
        "model": {"config": "tiny"}, "data": {**data, "seq_len": 256},
        "tokenizer": {"path": args.tokenizer},
        "train": {"steps": args.steps, "batch_size": 16, "micro_batch_size": 8,
                  "eval_every": 0, "checkpoint_every": 0, "keep_last": 1},
        "parallel": {"dp": 2}, "run": {"dir": args.run_dir}})
    trainer = Trainer(cfg, quiet=True)
    trainer.run()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rss)
    if dist.get_rank() == 0:
        Path(args.report).write_text(json.dumps(everyone))
    trainer.close()


def _case(case: str, tokenizer: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report, run_dir = Path(tmp) / "rss.json", Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               __file__, "--rank-worker", "--case", case, "--tokenizer", tokenizer,
               "--steps", str(steps), "--report", str(report), "--run-dir", str(run_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        rates = [r["tokens_per_s"] for r in records if r["kind"] == "train" and r["step"] > 5]
        return {"case": case, "rank_peak_rss_mib": json.loads(report.read_text()),
                "tokens_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer")
    parser.add_argument("--memory", help="JSONL corpus for the in-memory path")
    parser.add_argument("--prepared", nargs="+", default=[])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(args)
        return
    results = []
    for case in [args.memory, *args.prepared]:
        print(f"training from {case} ...", file=sys.stderr)
        results.append(_case(case, args.tokenizer, args.steps))
        if Path(case).is_dir():
            meta = json.loads((Path(case) / "meta.json").read_text())
            results[-1]["corpus_tokens"] = meta["splits"]["train"]["tokens"]
        else:
            results[-1]["corpus_bytes"] = Path(case).stat().st_size
        print(json.dumps(results[-1]), file=sys.stderr)
    print("| data | corpus | peak RSS rank 0 / rank 1 MiB | tokens/s |\n|---|---|---:|---:|")
    for r in results:
        size = (f"{r['corpus_tokens'] / 1e6:,.0f}M tokens" if "corpus_tokens" in r
                else f"{r['corpus_bytes'] / 1e6:,.0f} MB of JSONL")
        kind = "prepared" if "corpus_tokens" in r else "in memory"
        rss = " / ".join(f"{v:,.0f}" for v in r["rank_peak_rss_mib"])
        print(f"| {kind} | {size} | {rss} | {r['tokens_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
