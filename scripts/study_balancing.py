"""Load-balancing methods compared on one budget: the same model, data, seed and tokens.

Every method trains the embedded default model with 16 experts (top-2) on the default corpus
for ``--steps`` optimizer steps of 16 x 256 tokens (default 1250: 5.1M tokens), each an
ordinary ``skymoe train`` run under ``--root`` (inspect one with ``skymoe plot``). Runs resume
from their checkpoints, so the study can be done in parts: ``--until N`` advances every
unfinished run to step N at most (the learning-rate schedule always spans ``--steps``), and
``--only NAME...`` picks runs. A finished run's summary is kept under ``--results`` (in the
repository), so the parts may also be trained on different machines or days: a run with a
summary and no run directory is not trained again. ``--report`` reads what the runs have
logged (or their summaries) and prints, per run and MoE layer, means over the last ``--window`` steps of the drop rate, load CV, dead
experts (per step, and the largest count), gate sharpness (Max1/Max2, Max2/Max3), the aux
coefficient and the routing-bias spread, and the last validation loss; ``--out DIR`` writes
the table as Markdown and the comparison figures.

The global-batch loss has no run of its own: on one process with one micro-batch per step it is
the Switch loss over the micro-batch, bit for bit; it differs only under gradient accumulation
or data parallelism.

    python scripts/study_balancing.py --until 400          # a first part of every run
    python scripts/study_balancing.py                      # the rest
    python scripts/study_balancing.py --report --out docs/images/balancing
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from skymoe.train.plots import load_metrics  # noqa: E402
from study_runs import train_to  # noqa: E402

# Settings every run shares: 16 experts, the default capacity (factor 1.25 over each
# micro-batch), checkpoints often enough that an interrupted part loses little.
COMMON = ["model.overrides.num_experts=[16]", "moe.capacity_factor=1.25",
          "moe.routing_group_size=0", "train.checkpoint_every=100", "train.keep_last=1"]
SKYWORK, SWITCH = ['moe.aux_loss="skywork"'], ['moe.aux_loss="switch"']
ADAPTIVE, FIXED = ["moe.adaptive=true", "moe.aux_coef=0.01"], ["moe.adaptive=false"]
NO_BIAS, NO_LOSS = ["moe.expert_bias=false"], ["moe.adaptive=false", "moe.aux_coef=0.0"]
# In the order they run: the most telling first, so a partial study already compares them.
METHODS: dict[str, list[str]] = {
    "default": [],  # the Switch form with adaptive coefficients + routing biases
    "skywork-adaptive": [*SKYWORK, *ADAPTIVE, *NO_BIAS],
    "aux-free-bias": [*NO_LOSS, "moe.expert_bias=true"],
    "switch-0.01": [*SWITCH, *FIXED, "moe.aux_coef=0.01", *NO_BIAS],
    "none": [*NO_LOSS, *NO_BIAS],
    "skywork-fixed-0.01": [*SKYWORK, *FIXED, "moe.aux_coef=0.01", *NO_BIAS],
    "skywork-fixed-0.001": [*SKYWORK, *FIXED, "moe.aux_coef=0.001", *NO_BIAS],
    # The gating-normalization comparison: skywork-adaptive without normalization.
    "skywork-adaptive-no-norm": [*SKYWORK, *ADAPTIVE, *NO_BIAS,
                                 "model.overrides.moe_use_logits_norm=false"],
}
COLUMNS = ("drop_rate", "load_cv", "dead_experts", "max1_max2", "max2_max3")
PLOTTED = {"drop_rate": "drop rate", "load_cv": "load CV", "max1_max2": "Max1/Max2"}


def advance(run_dir: Path, until: int, total: int, settings: list[str]) -> None:
    """Train ``run_dir`` to step ``until`` (resuming), on a schedule of ``total`` steps."""
    train_to(run_dir, until, [f"train.lr_decay_steps={total}", *COMMON, *settings],
             eval_every=max(total // 25, 1))


def layer_stats(train: list[dict], window: int) -> dict[str, list[float]]:
    """Per MoE layer, the mean of each column and of the aux coefficient over the last
    ``window`` steps; also the largest dead-expert count and the final routing-bias spread
    (max - min; empty without biases)."""
    last = train[-window:]
    moe = [r["moe"] for r in last]
    out = {key: [statistics.fmean(col) for col in zip(*(m[key] for m in moe))]
           for key in (*COLUMNS, "aux_coef")}
    out["dead_max"] = [max(col) for col in zip(*(m["dead_experts"] for m in moe))]
    out["bias_spread"] = [hi - lo for hi, lo in zip(moe[-1].get("expert_bias_max", []),
                                                    moe[-1].get("expert_bias_min", []))]
    return out


def summarize(run_dir: Path, window: int) -> dict | None:
    """What the report needs of a run (None before its first step): its last step and
    tokens, per-layer means over the last ``window`` steps, the validation losses, and the
    layer means of the plotted columns at every step."""
    if not (run_dir / "metrics.jsonl").exists():
        return None
    train, val = load_metrics(run_dir)
    if not train:
        return None
    return {"steps": train[-1]["step"], "tokens": train[-1]["tokens"], "window": window,
            "layers": layer_stats(train, window),
            "val": [[r["step"], r["val_loss"]] for r in val],
            "series": {"step": [r["step"] for r in train],
                       **{key: [round(statistics.fmean(r["moe"][key]), 5) for r in train]
                          for key in PLOTTED}}}


def collect(root: Path, results: Path, names: list[str], steps: int, window: int
            ) -> dict[str, dict]:
    """Each run's summary, from its run directory when there is one (a finished run's is
    saved under ``results``, so the study's parts may be trained on different machines), else
    from its saved summary."""
    found = {}
    for name in names:
        summary = summarize(root / name, window)
        saved = results / f"{name}.json"
        if summary is not None and summary["steps"] >= steps:
            results.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_suffix(".tmp")
            tmp.write_text(json.dumps(summary) + "\n")
            tmp.replace(saved)
        elif summary is None and saved.exists():
            summary = json.loads(saved.read_text())
        if summary is not None:
            found[name] = summary
    return found


def _fmt(values: list[float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values) or "-"


def report(runs: dict[str, dict], out: Path | None) -> None:
    window = next(iter(runs.values()))["window"] if runs else 0
    rows = [f"Means over the last {window} logged steps of each run, per MoE layer "
            "(layer 0 / 1 / 2 / 3). Dead: experts without tokens per step (mean), and the "
            "most at any step. Coef: the mean aux coefficient; bias spread: max - min of the "
            "routing biases at the end.", "",
            "| run | steps | tokens | val loss | drop rate | load CV | dead (mean) | dead (max) "
            "| Max1/Max2 | Max2/Max3 | coef | bias spread |",
            "|---|---:|---:|---:|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        s = run["layers"]
        rows.append(
            f"| {name} | {run['steps']} | {run['tokens'] / 1e6:.2f}M | "
            f"{run['val'][-1][1] if run['val'] else float('nan'):.3f} | "
            f"{_fmt(s['drop_rate'], 3)} | {_fmt(s['load_cv'], 2)} | "
            f"{_fmt(s['dead_experts'], 2)} | {_fmt(s['dead_max'], 0)} | "
            f"{_fmt(s['max1_max2'], 2)} | {_fmt(s['max2_max3'], 2)} | "
            f"{_fmt(s['aux_coef'], 4)} | {_fmt(s['bias_spread'], 3)} |")
    table = "\n".join(rows)
    print(table)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_table.md").write_text(table + "\n")
    for key, label in PLOTTED.items():
        _layer_mean_figure(runs, key, label).savefig(out / f"study_{key}.png")
    _val_figure(runs).savefig(out / "study_val_loss.png")
    print(f"wrote {out}/study_table.md and the study_*.png figures")


def _line_style(index: int) -> str:
    """Solid for the first four runs, dashed after: runs that train identically (a coefficient
    that never leaves its cap) stay visible under one another."""
    return "-" if index < 4 else "--"


def _layer_mean_figure(runs: dict[str, dict], key: str, label: str) -> Figure:
    """The layer mean of ``key`` over steps (50-step moving mean), one line per run."""
    fig = Figure(figsize=(10, 4.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    for index, (name, run) in enumerate(runs.items()):
        means = run["series"][key]
        smooth = [statistics.fmean(means[max(0, i - 49):i + 1]) for i in range(len(means))]
        ax.plot(run["series"]["step"], smooth, label=name, lw=1.2, ls=_line_style(index))
    ax.set(xlabel="step", ylabel=f"{label} (mean over layers, 50-step moving mean)",
           title=f"{label} by balancing method")
    if key == "drop_rate":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _val_figure(runs: dict[str, dict]) -> Figure:
    fig = Figure(figsize=(10, 4.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    for i, (name, run) in enumerate(runs.items()):
        tail = [(step, loss) for step, loss in run["val"] if step >= 200]  # the early losses
        ax.plot(*zip(*tail), marker="o", ms=3, label=name,             # dwarf the differences
                ls=_line_style(i))
    ax.set(xlabel="step", ylabel="validation loss", title="validation loss by balancing method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/balancing-study"))
    parser.add_argument("--steps", type=int, default=1250, help="each run's whole budget")
    parser.add_argument("--until", type=int, help="advance the runs to this step only")
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), help="runs to advance")
    parser.add_argument("--report", action="store_true", help="only report, train nothing")
    parser.add_argument("--window", type=int, default=100, help="last steps averaged")
    parser.add_argument("--results", type=Path, default=Path("docs/balancing-results"),
                        help="where finished runs' summaries are kept (read when a run "
                             "directory is absent)")
    parser.add_argument("--out", type=Path, help="directory for the table and figures")
    args = parser.parse_args()
    names = args.only or list(METHODS)
    if not args.report:
        for name in names:
            if not (args.results / f"{name}.json").exists() or (args.root / name).exists():
                advance(args.root / name, min(args.until or args.steps, args.steps),
                        args.steps, METHODS[name])
            collect(args.root, args.results, [name], args.steps, args.window)
    report(collect(args.root, args.results, names, args.steps, args.window), args.out)


if __name__ == "__main__":
    main()
