"""Plots of a training run's metrics (the engine of ``skymoe plot RUN_DIR``).

``load_metrics`` reads ``RUN_DIR/metrics.jsonl`` (written by the trainer) and ``plot_run`` turns it
into PNGs: loss / learning rate / throughput, and for MoE models the per-layer token drop rate,
aux-loss coefficient, gate sharpness (Max1/Max2, Max2/Max3) and expert load, in the layout of the
Skywork-MoE report's figures (a layers x steps heatmap beside per-layer curves).

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
pyplot, so no window is ever opened and no global backend state is touched. Each PNG is written to
a temporary file in the output directory and moved into place, so a killed run never leaves half
a PNG behind.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError, SkymoeError

METRICS_FILE = "metrics.jsonl"
DPI = 120
WIDE = (10.0, 4.0)  # two-panel figures
MAX_LEGEND_LAYERS = 12  # more layers: no legend, a colorbar maps colour to layer
MAX_STEP_BINS = 1000  # heatmaps and per-layer curves of longer runs average steps into bins
MAX_LAYER_TICKS = 12


# ----------------------------------------------------------------------------------------------
# Reading


def load_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Read ``run_dir/metrics.jsonl`` into (train records, val records), each sorted by step.

    An unparsable last line (a run killed mid-write) is ignored. Records re-written for a step
    (a run resumed from an earlier checkpoint re-does steps) replace the earlier ones: the last
    record written for each step wins.
    """
    path = _metrics_path(run_dir)
    records = _read_records(path)
    train = _last_per_step(r for r in records if r.get("kind") == "train")
    val = _last_per_step(r for r in records if r.get("kind") == "val")
    if not train:
        raise DataError(f"{path} has no training records (\"kind\": \"train\"); "
                        "let the run log at least one step before plotting")
    return train, val


def _metrics_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; "
                        "pass the directory a training run wrote to")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"no {METRICS_FILE} in {run_dir}; is it a skymoe run directory?")
    return path


def _read_records(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; "
                        "check its permissions") from exc
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(numbered):
        record = _parse_line(path, lineno, line, is_last=pos == len(numbered) - 1)
        if record is not None:
            records.append(record)
    return records


def _parse_line(path: Path, lineno: int, line: str, is_last: bool) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        if is_last:  # truncated by a killed run
            return None
        raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); "
                        "fix or delete that line") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path} line {lineno} is not a JSON object; fix or delete that line")
    if record.get("kind") in ("train", "val") and not _is_int(record.get("step")):
        raise DataError(f"{path} line {lineno}: a {record['kind']} record needs an integer "
                        "\"step\"; fix or delete that line")
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _last_per_step(records) -> list[dict]:
    by_step: dict[int, dict] = {}
    for record in records:
        by_step[record["step"]] = record  # later lines overwrite earlier ones
    return [by_step[step] for step in sorted(by_step)]


# ----------------------------------------------------------------------------------------------
# Series extraction


def _num(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _series(records: list[dict], key: str) -> np.ndarray:
    return np.array([_num(r.get(key)) for r in records], dtype=float)


def _moe_layers(train: list[dict]) -> list[int]:
    layers: set[int] = set()
    for record in train:
        moe = record.get("moe")
        if isinstance(moe, dict) and isinstance(moe.get("layers"), list):
            layers.update(i for i in moe["layers"] if _is_int(i))
    return sorted(layers)


def _moe_matrix(train: list[dict], layers: list[int], key: str) -> np.ndarray | None:
    """(layers, steps) matrix of ``moe[key]``; NaN where a step did not log it; None if none did."""
    row = {layer: i for i, layer in enumerate(layers)}
    matrix = np.full((len(layers), len(train)), math.nan)
    for col, record in enumerate(train):
        moe = record.get("moe")
        if not isinstance(moe, dict) or not isinstance(moe.get(key), list):
            continue
        rec_layers, values = moe.get("layers"), moe[key]
        rec_layers = rec_layers if isinstance(rec_layers, list) else []
        if len(values) != len(rec_layers):
            raise DataError(f"{METRICS_FILE} step {record['step']}: moe.{key} has {len(values)} "
                            f"entries for {len(rec_layers)} MoE layers; the file is corrupt or "
                            "was not written by skymoe")
        for layer, value in zip(rec_layers, values):
            if layer in row:
                matrix[row[layer], col] = _num(value)
    return None if np.isnan(matrix).all() else matrix


# ----------------------------------------------------------------------------------------------
# Drawing helpers


def _new_figure(figsize=WIDE, ncols: int = 2, nrows: int = 1, **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes.ravel()


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step (midpoints between neighbours), for a non-uniform x axis."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def _bin_starts(n: int) -> np.ndarray | None:
    """First index of each of MAX_STEP_BINS equal bins of n steps; None when n is small enough."""
    if n <= MAX_STEP_BINS:
        return None
    return np.array([c[0] for c in np.array_split(np.arange(n), MAX_STEP_BINS)])


def _bin_mean(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """NaN-ignoring mean over step bins along the last axis (NaN for an all-NaN bin)."""
    finite = ~np.isnan(values)
    sums = np.add.reduceat(np.where(finite, values, 0.0), starts, axis=-1)
    counts = np.add.reduceat(finite, starts, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def _binned(steps: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Long runs averaged into at most MAX_STEP_BINS points (mean step, mean values)."""
    starts = _bin_starts(len(steps))
    if starts is None:
        return steps, matrix
    return _bin_mean(steps, starts), _bin_mean(matrix, starts)


def _heatmap_cells(steps: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x cell edges, values) of a heatmap, long runs averaged into at most MAX_STEP_BINS cells."""
    starts = _bin_starts(len(steps))
    if starts is None:
        return _edges(steps), matrix
    return _edges(steps)[np.append(starts, len(steps))], _bin_mean(matrix, starts)


def _layer_ticks(ax, layers: list[int], positions: np.ndarray) -> None:
    stride = max(1, math.ceil(len(layers) / MAX_LAYER_TICKS))
    idx = list(range(0, len(layers), stride))
    ax.set_yticks(positions[idx], [f"layer {layers[i]}" for i in idx])


def _heatmap(ax, steps: np.ndarray, layers: list[int], matrix: np.ndarray, label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    x, values = _heatmap_cells(steps, matrix)
    y = np.arange(len(layers) + 1) - 0.5
    mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(values), cmap="viridis", shading="flat")
    ax.figure.colorbar(mesh, ax=ax, label=label)
    _layer_ticks(ax, layers, np.arange(len(layers)))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlabel("step")
    ax.set_title(f"{label} per MoE layer")


def _layer_curves(ax, steps: np.ndarray, layers: list[int], matrix: np.ndarray,
                  label: str) -> None:
    import matplotlib
    from matplotlib import cm, colors

    cmap = matplotlib.colormaps["viridis"]
    norm = colors.Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    lw = 1.2 if len(layers) <= MAX_LEGEND_LAYERS else 0.8
    n_steps = len(steps)
    steps, matrix = _binned(steps, matrix)
    for row, layer in enumerate(layers):
        ax.plot(steps, matrix[row], color=cmap(norm(layer)), lw=lw, label=f"layer {layer}")
    if len(layers) <= MAX_LEGEND_LAYERS:
        ax.legend(fontsize="small", ncol=2 if len(layers) > 6 else 1)
    else:
        ax.figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="MoE layer")
    binned = len(steps) < n_steps
    ax.set_xlabel(f"step (mean of ~{n_steps // len(steps)}-step bins)" if binned else "step")
    ax.set_ylabel(label)
    ax.set_title(f"{label} per MoE layer")
    ax.grid(alpha=0.3)


def _heatmap_and_curves(steps: np.ndarray, layers: list[int], matrix: np.ndarray, label: str,
                        title: str):
    """The Skywork-MoE report layout: layers x steps heatmap (left), per-layer curves (right)."""
    fig, (left, right) = _new_figure()
    _heatmap(left, steps, layers, matrix, label)
    _layer_curves(right, steps, layers, matrix, label)
    fig.suptitle(title)
    return fig


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes,
            color="gray")


def _curve(ax, steps: np.ndarray, values: np.ndarray, ylabel: str, **kwargs) -> None:
    if np.isnan(values).all():
        _no_data(ax, ylabel)
    else:
        ax.plot(steps, values, **kwargs)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------------------------
# Figures


def _loss_figure(train: list[dict], val: list[dict]):
    steps = _series(train, "step")
    fig, (ax_loss, ax_lr, ax_tps) = _new_figure(figsize=(10.0, 7.5), ncols=1, nrows=3,
                                                sharex=True, height_ratios=[2, 1, 1])
    loss, ce = _series(train, "loss"), _series(train, "ce_loss")
    _curve(ax_loss, steps, loss, "loss", lw=1.2, label="train loss")
    both = ~(np.isnan(loss) | np.isnan(ce))
    if both.any() and not np.allclose(loss[both], ce[both], rtol=0, atol=1e-6):
        ax_loss.plot(steps, ce, lw=1.0, alpha=0.8, label="train CE loss")
    if val:
        ax_loss.plot(_series(val, "step"), _series(val, "val_loss"), "o", color="C3", ms=5,
                     label="validation loss")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize="small")
    ax_loss.set_title("loss")
    _curve(ax_lr, steps, _series(train, "lr"), "learning rate", color="C2")
    _curve(ax_tps, steps, _series(train, "tokens_per_s"), "tokens/s", color="C4")
    ax_tps.set_xlabel("step")
    fig.suptitle("training")
    return fig


def _gate_sharpness_figure(steps, layers, max12, max23):
    fig, axes = _new_figure()
    for ax, matrix, label in ((axes[0], max12, "Max1/Max2"), (axes[1], max23, "Max2/Max3")):
        if matrix is None:
            _no_data(ax, label)
        else:
            _layer_curves(ax, steps, layers, matrix, label)
        ax.axhline(1.0, color="black", ls="--", lw=0.8)
    fig.suptitle("gate sharpness (ratio of top gate probabilities)")
    return fig


def _expert_load_figure(steps, layers, load_cv, dead):
    fig, (left, right) = _new_figure()
    if load_cv is None:
        _no_data(left, "load CV")
    else:
        _heatmap(left, steps, layers, load_cv, "load CV")
    if dead is None:
        _no_data(right, "dead experts")
    else:
        total = np.where(np.isnan(dead).all(axis=0), math.nan, np.nansum(dead, axis=0))
        right.plot(steps, total, color="C3", drawstyle="steps-post")
        right.yaxis.get_major_locator().set_params(integer=True)
        right.set_title("dead experts (all MoE layers)")
    right.set_xlabel("step")
    right.set_ylabel("dead experts")
    right.grid(alpha=0.3)
    fig.suptitle("expert load balance")
    return fig


def _expert_bias_figure(steps, layers, bias_max, bias_min):
    fig, axes = _new_figure()
    for ax, matrix, label in ((axes[0], bias_max, "largest bias"),
                              (axes[1], bias_min, "smallest bias")):
        _layer_curves(ax, steps, layers, matrix, label)
        ax.axhline(0.0, color="black", ls="--", lw=0.8)
    fig.suptitle("routing biases (auxiliary-loss-free balancing)")
    return fig


def _moe_figures(train: list[dict]) -> dict[str, Callable[[], Any]]:
    """Builders of the MoE figures, by file name; empty for a dense model."""
    layers = _moe_layers(train)
    if not layers:
        return {}
    steps = _series(train, "step")
    m = {key: _moe_matrix(train, layers, key)
         for key in ("drop_rate", "aux_coef", "max1_max2", "max2_max3", "load_cv", "dead_experts",
                     "expert_bias_max", "expert_bias_min")}
    figures: dict[str, Callable[[], Any]] = {}
    if m["drop_rate"] is not None:
        figures["drop_rate.png"] = lambda: _heatmap_and_curves(
            steps, layers, m["drop_rate"], "drop rate", "token drop rate")
    if m["aux_coef"] is not None:
        figures["aux_coef.png"] = lambda: _heatmap_and_curves(
            steps, layers, m["aux_coef"], "aux-loss coefficient", "auxiliary loss coefficient")
    if m["max1_max2"] is not None or m["max2_max3"] is not None:
        figures["gate_sharpness.png"] = lambda: _gate_sharpness_figure(
            steps, layers, m["max1_max2"], m["max2_max3"])
    if m["load_cv"] is not None or m["dead_experts"] is not None:
        figures["expert_load.png"] = lambda: _expert_load_figure(
            steps, layers, m["load_cv"], m["dead_experts"])
    if m["expert_bias_max"] is not None and m["expert_bias_min"] is not None:
        figures["expert_bias.png"] = lambda: _expert_bias_figure(
            steps, layers, m["expert_bias_max"], m["expert_bias_min"])
    return figures


# ----------------------------------------------------------------------------------------------
# Writing


def _save_atomic(fig, path: Path) -> None:
    # a plain open (not mkstemp, whose files are 0600) so the PNG gets the usual umask permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _output_dir(run_dir: Path, out_dir: str | Path | None) -> Path:
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SkymoeError(f"cannot create plot directory {out}: {exc.strerror or exc}; "
                          "pass a writable output directory") from exc
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Plot a run's metrics as PNGs in ``out_dir`` (default ``run_dir/plots``); returns their paths.

    Always ``loss.png``; for MoE runs also ``drop_rate.png``, ``aux_coef.png``,
    ``gate_sharpness.png``, ``expert_load.png`` and, with routing biases, ``expert_bias.png``
    (each only if its metrics were logged).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SkymoeError("plotting needs matplotlib; install it with "
                          "`pip install matplotlib`") from exc
    train, val = load_metrics(run_dir)
    out = _output_dir(Path(run_dir), out_dir)
    builders = {"loss.png": lambda: _loss_figure(train, val), **_moe_figures(train)}
    paths = []
    for name, build in builders.items():
        path = out / name
        _save_atomic(build(), path)
        paths.append(path)
    return paths
