"""Checkpoint saving under torchrun: the gathered HF checkpoint (everything onto rank 0) vs the
sharded one (every rank writes its own pieces through torch.distributed.checkpoint).

A Skywork-shaped MoE of about 320M parameters (hidden 1024, 4 layers of 16 experts, top-2) is
trained for one step under DP 2 x TP 2 with experts over DP and sliced over TP (ZeRO-1, fused
AdamW), so every rank holds its cut of the weights and of the moments. Then the same state is
saved in both formats, alternating, ``--rounds`` times each; per rank a thread samples the
process's resident memory (``/proc/self/statm``, every 2 ms) during each save, and the save's
wall time is taken between barriers. Reported: per rank, the median peak RSS growth, and the
median wall time, per format, and rank 0's ratio. Freed memory is returned to the OS
(``train.keep_freed_memory = false``) and the sharded save runs first in each round.

Usage: torchrun --nproc-per-node 4 benchmarks/bench_checkpoint.py [--rounds 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch.distributed as dist

from skymoe.config import parameter_counts
from skymoe.train import config as train_config
from skymoe.train.trainer import Trainer

MODEL = dict(hidden_size=1024, intermediate_size=1536, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, num_experts=16,
             num_experts_per_tok=2, max_position_embeddings=1024)
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """The highest resident set size seen while the block runs, sampled every 2 ms."""

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # One directory for all ranks of this launch (its rendezvous port is unique).
    root = Path(tempfile.gettempdir()) / f"bench-ckpt-{os.environ['MASTER_PORT']}"
    cfg = train_config.from_dict({
        "model": {"overrides": MODEL},
        "data": {"max_bytes": 2_000_000, "seq_len": 64},
        "tokenizer": {"vocab_size": 4096},
        "train": {"steps": 1, "batch_size": 4, "micro_batch_size": 2, "eval_every": 0,
                  "checkpoint_every": 0, "keep_last": 1,
                  # Freed memory goes back to the OS, so one save's garbage cannot hide the
                  # next one's growth.
                  "keep_freed_memory": False},
        "parallel": {"dp": 2, "tp": 2, "expert": "etp"},
        "run": {"dir": str(root / "run")}})
    trainer = Trainer(cfg, quiet=True)
    trainer.run()  # one step: every rank holds its AdamW moments
    rank = dist.get_rank()
    results: dict[str, dict[str, list[float]]] = {"hf": {"growth": [], "seconds": []},
                                                  "sharded": {"growth": [], "seconds": []}}
    for _ in range(args.rounds):
        for fmt in ("sharded", "hf"):  # the sharded save first: it never reuses a gather's
            trainer.sharded = fmt == "sharded"
            dist.barrier()
            with PeakRss() as rss:
                began = time.perf_counter()
                trainer.save()
                dist.barrier()
                seconds = time.perf_counter() - began
            results[fmt]["growth"].append(rss.growth)
            results[fmt]["seconds"].append(seconds)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if rank == 0:
        params = parameter_counts(trainer.model.config)["total"]
        report = {"parameters": params, "layout": cfg.layout().name, "rounds": args.rounds,
                  "ranks": [{fmt: {"peak_growth_mib": statistics.median(r[fmt]["growth"]) / 2**20,
                                   "seconds": statistics.median(r[fmt]["seconds"])}
                             for fmt in r} for r in everyone]}
        print(f"{params / 1e6:.0f}M parameters, {report['layout']}, median of {args.rounds}")
        print("| rank | gathered: peak RSS growth | sharded: peak RSS growth | gathered: s "
              "| sharded: s |\n|---:|---:|---:|---:|---:|")
        for r, entry in enumerate(report["ranks"]):
            print(f"| {r} | {entry['hf']['peak_growth_mib']:.2f} MiB | "
                  f"{entry['sharded']['peak_growth_mib']:.2f} MiB | {entry['hf']['seconds']:.2f} "
                  f"| {entry['sharded']['seconds']:.2f} |")
        zero = report["ranks"][0]
        print(f"rank 0: sharded growth / gathered growth = "
              f"{zero['sharded']['peak_growth_mib'] / zero['hf']['peak_growth_mib']:.5f}; "
              f"wall time sharded / gathered = "
              f"{zero['sharded']['seconds'] / zero['hf']['seconds']:.2f}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    trainer.close()


if __name__ == "__main__":
    main()
