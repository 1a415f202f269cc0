"""What the study scripts share: ``skymoe train`` runs that resume where they stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from skymoe.train.plots import load_metrics
from skymoe.train.run_state import latest_checkpoint


def last_step(run_dir: Path) -> int:
    """The last step ``run_dir`` logged (0: none)."""
    if not (run_dir / "metrics.jsonl").exists():
        return 0
    train, _ = load_metrics(run_dir)
    return train[-1]["step"] if train else 0


def train_to(run_dir: Path, steps: int, settings: list[str] | tuple[str, ...],
             eval_every: int) -> None:
    """``skymoe train`` into ``run_dir`` up to step ``steps`` with ``--set`` ``settings``,
    resuming from its latest checkpoint; nothing if the run already got there."""
    if last_step(run_dir) >= steps:
        return
    cmd = [sys.executable, "-m", "skymoe", "train", "--run-dir", str(run_dir), "--steps",
           str(steps), "--set", f"train.eval_every={eval_every}"]
    if latest_checkpoint(run_dir) is not None:
        cmd.append("--resume")
    for s in settings:
        cmd += ["--set", s]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
