"""Training-metric plots: metrics.jsonl reading (resume de-duplication, truncation) and PNGs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from skymoe.errors import DataError
from skymoe.train import plots
from skymoe.train.plots import load_metrics, plot_run

MOE_FILES = ["loss.png", "drop_rate.png", "aux_coef.png", "gate_sharpness.png", "expert_load.png"]


def _train_record(step: int, layers: list[int] | None, offset: float = 0.0) -> dict:
    loss = 6.0 - 0.05 * step + offset
    record = {"kind": "train", "step": step, "tokens": 4096 * step, "loss": loss,
              "ce_loss": loss - 0.01, "lr": 3e-4 * min(1.0, step / 10), "grad_norm": 1.0,
              "tokens_per_s": 800.0 + step}
    if layers is not None:
        n = len(layers)
        record["moe"] = {
            "layers": layers,
            "drop_rate": [0.05 / (1 + step) * (i + 1) for i in range(n)],
            "aux_coef": [0.01 * (1 - step / 40) / (i + 1) for i in range(n)],
            "aux_loss": [0.001] * n,
            "load_min": [0.02] * n,
            "load_max": [0.2 - 0.001 * step] * n,
            "load_cv": [0.6 - 0.01 * step + 0.1 * i for i in range(n)],
            "dead_experts": [int(step < 5 and i == 0) for i in range(n)],
            "max1_max2": [2.5 + 0.01 * step + i for i in range(n)],
            "max2_max3": [1.3 + 0.005 * step for i in range(n)],
        }
    return record


def _write_run(run_dir: Path, layers: list[int] | None = (1, 3, 5)) -> Path:
    """30 steps, val every 10, a resume re-doing steps 21-25 (loss + 100), a truncated last line."""
    layers = list(layers) if layers is not None else None
    lines = []
    for step in range(1, 31):
        lines.append(json.dumps(_train_record(step, layers)))
        if step % 10 == 0:
            lines.append(json.dumps({"kind": "val", "step": step, "val_loss": 5.0 - step / 100,
                                     "val_ppl": 150.0}))
    for step in range(21, 26):  # resumed from the step-20 checkpoint
        lines.append(json.dumps(_train_record(step, layers, offset=100.0)))
    lines.append(json.dumps({"kind": "val", "step": 20, "val_loss": 4.5, "val_ppl": 90.0}))
    lines.append(json.dumps(_train_record(26, layers))[:40])  # killed mid-write
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_load_metrics_keeps_last_record_per_step(tmp_path):
    train, val = load_metrics(_write_run(tmp_path / "run"))
    assert [r["step"] for r in train] == list(range(1, 31))  # truncated step-26 rewrite ignored
    by_step = {r["step"]: r for r in train}
    assert by_step[23]["loss"] == pytest.approx(6.0 - 0.05 * 23 + 100.0)  # the resumed value
    assert by_step[26]["loss"] == pytest.approx(6.0 - 0.05 * 26)
    assert by_step[20]["loss"] == pytest.approx(6.0 - 0.05 * 20)
    assert [r["step"] for r in val] == [10, 20, 30]
    assert val[1]["val_loss"] == 4.5


def test_load_metrics_corrupt_middle_line(tmp_path):
    run = _write_run(tmp_path / "run")
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")
    lines[4] = '{"kind": "train", "step": 5, "loss":'
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"metrics\.jsonl line 5\b"):
        load_metrics(run)


def test_load_metrics_missing_dir_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_metrics(tmp_path / "nope")
    with pytest.raises(DataError, match="no metrics.jsonl in .*skymoe run directory"):
        load_metrics(tmp_path)


def test_load_metrics_without_train_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"kind": "val", "step": 10, "val_loss": 5.0, "val_ppl": 148.4}) + "\n")
    with pytest.raises(DataError, match="no training records"):
        load_metrics(tmp_path)


def _check_pngs(paths: list[Path], plots_dir: Path, names: list[str]) -> None:
    assert [p.name for p in paths] == names
    for path in paths:
        assert path.parent == plots_dir
        width, height = _png_size(path)
        assert width > 300 and height > 300, (path.name, width, height)
    assert sorted(p.name for p in plots_dir.iterdir()) == sorted(names)  # no temp leftovers


def test_plot_run_moe(tmp_path):
    run = _write_run(tmp_path / "run")
    paths = plot_run(run)
    _check_pngs(paths, run / "plots", MOE_FILES)
    assert _png_size(run / "plots" / "drop_rate.png")[0] >= 1000  # ~10 in at 120 dpi


def test_plot_run_dense_and_out_dir(tmp_path):
    run = _write_run(tmp_path / "run", layers=None)
    out = tmp_path / "elsewhere" / "figs"
    _check_pngs(plot_run(run, out), out, ["loss.png"])
    assert not (run / "plots").exists()


def test_plot_run_many_layers_and_binned_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "MAX_STEP_BINS", 7)  # exercise the long-run averaging path
    run = _write_run(tmp_path / "run", layers=list(range(1, 53)))  # no legend, colorbar instead
    _check_pngs(plot_run(run), run / "plots", MOE_FILES)


def test_step_bins_average_and_ignore_nan(monkeypatch):
    monkeypatch.setattr(plots, "MAX_STEP_BINS", 2)
    steps = np.arange(1.0, 5.0)
    matrix = np.array([[1.0, 3.0, np.nan, np.nan], [2.0, np.nan, 4.0, 6.0]])
    x, values = plots._binned(steps, matrix)
    np.testing.assert_allclose(x, [1.5, 3.5])
    np.testing.assert_allclose(values, [[2.0, np.nan], [2.0, 5.0]])
    edges, _ = plots._heatmap_cells(steps, matrix)
    np.testing.assert_allclose(edges, [0.5, 2.5, 4.5])


def test_failed_save_leaves_no_partial_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        fname.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    run = _write_run(tmp_path / "run", layers=None)
    with pytest.raises(OSError, match="disk full"):
        plot_run(run)
    assert list((run / "plots").iterdir()) == []


def test_plot_run_with_routing_biases(tmp_path):
    run = _write_run(tmp_path / "run")
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "moe" in record:
            step = record["step"]
            record["moe"]["expert_bias_max"] = [0.001 * step * (i + 1) for i in range(3)]
            record["moe"]["expert_bias_min"] = [-0.002 * step for _ in range(3)]
        records.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(records))
    _check_pngs(plot_run(run), run / "plots", MOE_FILES + ["expert_bias.png"])
