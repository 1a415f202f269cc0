"""``skymoe train`` (a training run, also under torchrun) and ``skymoe plot`` (its metrics as
PNGs)."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

from ..train import config as train_config



def register(top: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``plot``."""
    p = top.add_parser(
        "train", help="train a Skywork-MoE model (default: a small one on the Python standard "
                      "library's source)",
        description="Train with Skywork-MoE's techniques: gating logit normalization, capacity "
                    "and token dropping, aux balance losses with per-layer adaptive "
                    "coefficients, and auxiliary-loss-free routing biases. Settings come from "
                    "a TOML file (sections model, data, tokenizer, train, moe, parallel, run; "
                    "see docs/training.md) and --set "
                    "overrides; with none, the embedded default runs. Ctrl-C saves a checkpoint "
                    "and stops. Several processes: torchrun --nproc-per-node N -m skymoe train "
                    "--set parallel.tp=2 --set parallel.expert=edp (docs/distributed.md).")
    p.add_argument("config", nargs="?", help="TOML config file (optional)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="run directory (same as --set run.dir=...)")
    p.add_argument("--steps", type=int, help="train up to this step (same as --set train.steps=N)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = top.add_parser(
        "plot", help="plot a run's metrics (loss, drop rate, coefficients, ...)",
        description="Write PNG plots of a training run's metrics.jsonl: loss, per-layer drop "
                    "rate and aux coefficients (heatmaps and curves), gate sharpness, "
                    "expert load and, for runs with routing biases, their range.")
    p.add_argument("run_dir", help="training run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)


def cmd_train(args: argparse.Namespace) -> int:
    """Train; rank 0 prints where the results are. An interrupted run exits 128 + signal."""
    # Loaded here, not with the CLI: the trainer imports torch.distributed.pipelining (about
    # 1.3 s, torch._dynamo included) and the plots matplotlib.
    from ..train.plots import plot_run
    from ..train.trainer import Trainer

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
    trainer = Trainer(train_config.load(config_path, overrides), resume=args.resume)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if not trainer.is_main:  # under torchrun, rank 0 reports
        return 128 + trainer.stop_signal if summary.interrupted else 0
    plots = plot_run(summary.run_dir)
    print(f"checkpoint: {summary.checkpoint or '(none)'}\n"
          f"metrics:    {summary.run_dir / 'metrics.jsonl'}\n"
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


def cmd_plot(args: argparse.Namespace) -> None:
    """Write the plots and print their paths."""
    from ..train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
