"""Gating logit normalization on vs off: compare two finished training runs.

Prints, per MoE layer, the drop rate, gate sharpness (Max1/Max2, Max2/Max3) and aux coefficient
averaged over the last ``--window`` steps, plus the final losses, and writes a comparison figure
(layer-mean sharpness and drop rate over steps, one line per run).

The runs of docs/training.md's study (with the balancing defaults before 2026-12-05):
    OLD="--set moe.aux_loss=skywork --set moe.aux_coef=0.001 --set moe.routing_group_size=1
         --set moe.expert_bias=false"
    skymoe train --run-dir runs/study-norm-true  --set moe.capacity_factor=2.0 $OLD
    skymoe train --run-dir runs/study-norm-false --set moe.capacity_factor=2.0 $OLD \\
        --set model.overrides.moe_use_logits_norm=false
    python scripts/study_gating_norm.py runs/study-norm-true runs/study-norm-false \\
        --out docs/images/gating_norm_study.png
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from skymoe.train.plots import load_metrics  # noqa: E402

COLUMNS = ("drop_rate", "max1_max2", "max2_max3", "aux_coef")


def layer_means(records: list[dict], key: str, window: int) -> list[float]:
    rows = [r["moe"][key] for r in records[-window:]]
    return [statistics.fmean(col) for col in zip(*rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("with_norm", type=Path, help="run directory, normalization on")
    parser.add_argument("without_norm", type=Path, help="run directory, normalization off")
    parser.add_argument("--window", type=int, default=50, help="last steps averaged")
    parser.add_argument("--out", type=Path, help="comparison PNG to write")
    args = parser.parse_args()

    runs = {"norm on": args.with_norm, "norm off": args.without_norm}
    fig = Figure(figsize=(10, 4), dpi=120, layout="constrained")
    ax_sharp, ax_drop = fig.subplots(1, 2)
    for label, run_dir in runs.items():
        train, val = load_metrics(run_dir)
        print(f"{label} ({run_dir}): final train loss {train[-1]['loss']:.3f}"
              + (f", validation loss {val[-1]['val_loss']:.3f}" if val else ""))
        print(f"  {'layer':>5} " + " ".join(f"{c:>10}" for c in COLUMNS))
        means = {c: layer_means(train, c, args.window) for c in COLUMNS}
        for i, layer in enumerate(train[-1]["moe"]["layers"]):
            print(f"  {layer:>5} " + " ".join(f"{means[c][i]:>10.4f}" for c in COLUMNS))
        steps = [r["step"] for r in train]
        ax_sharp.plot(steps, [statistics.fmean(r["moe"]["max1_max2"]) for r in train], label=label)
        ax_drop.plot(steps, [statistics.fmean(r["moe"]["drop_rate"]) for r in train], label=label)
    ax_sharp.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax_sharp.set(title="gate sharpness Max1/Max2 (mean over layers)", xlabel="step")
    ax_drop.set(title="drop rate (mean over layers)", xlabel="step")
    for ax in (ax_sharp, ax_drop):
        ax.grid(alpha=0.3)
        ax.legend()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
