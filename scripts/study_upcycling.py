"""Upcycling vs training from scratch at small scale (the report's ablation, on the default corpus).

1. Train a dense model (the ``tiny-dense`` preset) on the standard library's source.
2. Upcycle its final checkpoint into an 8-expert top-2 Skywork-MoE.
3. At two MoE budgets (in optimizer steps of the same batch), train
   (a) the upcycled model with a fresh warmup + cosine schedule,
   (b) the upcycled model with a small constant LR (the dense run's final LR),
   (c) the same MoE architecture from scratch (warmup + cosine).
4. Print the final validation losses and plot validation loss over steps for every arm.

Every run is an ordinary ``skymoe train`` run under ``--root`` (default runs/upcycle-study), so
each can be inspected with ``skymoe plot``. Runs that already finished are reused.

Usage: python scripts/study_upcycling.py [--dense-steps 300] [--budgets 100 400] [--out PNG]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from skymoe.train.run_state import latest_checkpoint  # noqa: E402
from skymoe.train.plots import load_metrics  # noqa: E402
from study_runs import train_to  # noqa: E402

DENSE_LR, DENSE_MIN_LR = 2e-3, 2e-4


# Settings every run gets: the balancing the measured runs used (the defaults before
# 2026-12-05), and --max-bytes.
COMMON: list[str] = ['moe.aux_loss="skywork"', "moe.aux_coef=0.001", "moe.capacity_factor=1.0",
                     "moe.routing_group_size=1", "moe.expert_bias=false"]


def train(run_dir: Path, steps: int, *settings: str) -> None:
    """``skymoe train`` into ``run_dir`` unless it already reached ``steps``."""
    train_to(run_dir, steps, [*COMMON, *settings], eval_every=max(steps // 10, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/upcycle-study"))
    parser.add_argument("--dense-steps", type=int, default=300)
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 400],
                        help="MoE training budgets in steps")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=0,
                        help="use only this much of the corpus (quick trials)")
    parser.add_argument("--out", type=Path, help="PNG of the validation-loss curves")
    args = parser.parse_args()
    if args.max_bytes:
        COMMON.append(f"data.max_bytes={args.max_bytes}")

    dense_run = args.root / "dense"
    train(dense_run, args.dense_steps, 'model.config="tiny-dense"', f"train.lr={DENSE_LR}",
          f"train.min_lr={DENSE_MIN_LR}")
    dense_ckpt = latest_checkpoint(dense_run)
    moe_dir = args.root / "upcycled-init"
    if not (moe_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "skymoe", "upcycle", str(dense_ckpt), str(moe_dir),
                        "--experts", str(args.experts), "--top-k", "2"], check=True)
    tokenizer = f'tokenizer.path="{dense_ckpt}"'
    arms = {
        "upcycled, fresh warmup + cosine": [f'model.init_from="{moe_dir}"'],
        "upcycled, constant small LR": [f'model.init_from="{moe_dir}"', 'train.schedule="constant"',
                                        f"train.lr={DENSE_MIN_LR}"],
        "MoE from scratch": [f'model.config="{moe_dir}"', tokenizer],
    }
    fig = Figure(figsize=(11, 4), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(args.budgets), squeeze=False)[0]
    dense_val = load_metrics(dense_run)[1]
    print(f"\ndense model: {args.dense_steps} steps, final validation loss "
          f"{dense_val[-1]['val_loss']:.3f}")
    table = {}
    for ax, budget in zip(axes, args.budgets):
        for label, settings in arms.items():
            slug = label.split(",")[0].replace(" ", "-") + ("-const" if "constant" in label else "")
            run_dir = args.root / f"{slug}-{budget}"
            train(run_dir, budget, *settings)
            _, val = load_metrics(run_dir)
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o",
                    markersize=3, label=label)
            table[(budget, label)] = val[-1]["val_loss"]
        ax.axhline(dense_val[-1]["val_loss"], color="grey", linestyle="--", linewidth=0.8,
                   label="dense model (start of upcycling)")
        ax.set(title=f"MoE budget {budget} steps", xlabel="MoE training step",
               ylabel="validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    print(f"\n{'budget':>7}  " + "  ".join(f"{label:>32}" for label in arms))
    for budget in args.budgets:
        print(f"{budget:>7}  " + "  ".join(f"{table[(budget, label)]:>32.3f}" for label in arms))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out)
        print(f"wrote {args.out}")
    (args.root / "summary.json").write_text(json.dumps(
        {f"{b} {label}": v for (b, label), v in table.items()}, indent=2))


if __name__ == "__main__":
    main()
