"""Sharded checkpoints: pieces written by several ranks and read back under another cut, the
metadata reader that refuses code, atomic sharded saves, and ``skymoe export`` (streamed, equal
to what a single-process run writes, FP8 as ``skymoe quantize`` writes it, never half-written).
The multi-process training runs are in test_parallel_train.py."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from skymoe.checkpoint import load_model
from skymoe.checkpoint.dcp import Piece, ShardedCheckpoint, load_pieces, save_pieces
from skymoe.cli import main
from skymoe.errors import CheckpointError
from skymoe.export import export_checkpoint
from skymoe.train import run_state
from skymoe.train.trainer import Trainer

from distributed import spawn
from test_train import _config

WHOLE = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5) / 7  # rows split 4 + 3
NORM = torch.linspace(-1, 1, 6)


def _write_halves(rank: int, world: int, directory: str) -> None:
    rows = (0, 4) if rank == 0 else (4, 7)
    save_pieces({"w": Piece(WHOLE[rows[0]:rows[1]].clone(), (7, 5), (rows[0], 0)),
                 "norm": Piece.whole(NORM.clone())}, directory)  # identical on both ranks


def _read_columns(rank: int, world: int, directory: str) -> None:
    # Another cut of the same tensor: columns, three ranks' worth read by two.
    cols = (0, 2) if rank == 0 else (2, 5)
    dest = torch.zeros(7, cols[1] - cols[0])
    load_pieces({"w": Piece(dest, (7, 5), (0, cols[0]))}, directory)
    assert torch.equal(dest, WHOLE[:, cols[0]:cols[1]])


def test_pieces_of_two_ranks_are_read_back_under_another_cut(tmp_path):
    spawn(_write_halves, 2, str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    spawn(_read_columns, 2, str(tmp_path))
    whole = ShardedCheckpoint(tmp_path).read(["w", "norm"])
    assert torch.equal(whole["w"], WHOLE) and torch.equal(whole["norm"], NORM)
    # One process reads an arbitrary window spanning both ranks' rows.
    window = torch.zeros(3, 2)
    load_pieces({"w": Piece(window, (7, 5), (3, 1))}, tmp_path)
    assert torch.equal(window, WHOLE[3:6, 1:3])
    with pytest.raises(CheckpointError, match="holds no tensor 'bias'"):
        load_pieces({"bias": Piece.whole(torch.zeros(3))}, tmp_path)
    with pytest.raises(CheckpointError, match=r"has shape \[7, 5\], the model expects \[7, 6\]"):
        load_pieces({"w": Piece.whole(torch.zeros(7, 6))}, tmp_path)


def test_a_piece_must_fit_its_tensor():
    with pytest.raises(ValueError, match="does not fit"):
        Piece(torch.zeros(3, 2), (4, 2), (2, 0))


class _RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_metadata_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_pieces({"w": Piece.whole(WHOLE.clone())}, tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match="refused global posix.system"):
        ShardedCheckpoint(tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "ckpt" / ".metadata").write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        load_pieces({"w": Piece.whole(torch.zeros(7, 5))}, tmp_path / "ckpt")


# ------------------------------------------------------------------ runs, saving and export
SETTINGS = dict(train={"precision": "fp32", "steps": 2, "lr_decay_steps": 2, "batch_size": 4,
                       "micro_batch_size": 2, "checkpoint_every": 1, "eval_every": 0})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The same two-step run saved in both formats (one process)."""
    root = tmp_path_factory.mktemp("runs")
    for fmt in ("hf", "sharded"):
        cfg = _config(root, fmt, train={**SETTINGS["train"], "checkpoint_format": fmt})
        if fmt == "sharded":
            cfg.tokenizer.path = str(root / "hf" / "tokenizer")
        trainer = Trainer(cfg, quiet=True)
        trainer.run()
        trainer.close()
    return root


def test_a_sharded_checkpoint_holds_pieces_and_a_clear_error_for_hf_loaders(runs):
    ckpt = run_state.latest_checkpoint(runs / "sharded")
    assert run_state.is_sharded(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "sharded", "tokenizer.json", "tokenizer_config.json", "training"]
    keys = ShardedCheckpoint(ckpt / "sharded").shapes()
    # Experts stacked: w1 and w3 of each expert side by side, so a rank's block is compact.
    assert keys["model.layers.1.block_sparse_moe.experts.w13"][0] == (4, 2, 64, 32)
    assert keys["model.layers.1.block_sparse_moe.experts.w2"][0] == (4, 32, 64)
    assert "optimizer.exp_avg_sq.model.layers.0.self_attn.q_proj.weight" in keys
    with pytest.raises(CheckpointError, match="sharded training checkpoint.*skymoe export"):
        load_model(ckpt)


def test_export_equals_the_single_process_checkpoint_and_fp8_equals_quantize(runs, tmp_path,
                                                                             capsys):
    hf_ckpt = run_state.latest_checkpoint(runs / "hf")
    assert main(["export", str(runs / "sharded"), str(tmp_path / "out")]) == 0
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    written = load_file(str(hf_ckpt / "model.safetensors"))
    assert sorted(exported) == sorted(written)
    for name, tensor in written.items():
        assert torch.equal(exported[name], tensor), name
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert load_model(tmp_path / "out").config.to_hf_dict() == \
        load_model(hf_ckpt).config.to_hf_dict()

    assert main(["export", str(runs / "sharded"), str(tmp_path / "out")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err

    assert main(["export", str(runs / "sharded"), str(tmp_path / "fp8"), "--to", "fp8"]) == 0
    assert main(["quantize", str(hf_ckpt), str(tmp_path / "quantized"), "--to", "fp8"]) == 0
    ours = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "quantized" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert any(t.dtype == torch.float8_e4m3fn for t in ours.values())
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(
            ours[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_an_interrupted_export_leaves_nothing(runs, tmp_path, monkeypatch):
    calls = []
    real = ShardedCheckpoint.read_block

    def failing(self, *block):
        calls.append(block)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *block)

    monkeypatch.setattr(ShardedCheckpoint, "read_block", failing)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(runs / "sharded", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_sharded_save_keeps_the_earlier_checkpoints(runs, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    ckpt = run_state.latest_checkpoint(runs / "sharded")
    pieces = {"w": Piece.whole(WHOLE.clone())}
    config = load_model(run_state.latest_checkpoint(runs / "hf")).config
    first = run_state.save_sharded_checkpoint(run_dir, 1, pieces, config, {"step": 1},
                                              tokenizer_dir=ckpt)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_state, "save_pieces", full_disk)
    with pytest.raises(CheckpointError, match="step-00000002.*intact"):
        run_state.save_sharded_checkpoint(run_dir, 2, pieces, config, {"step": 2},
                                          tokenizer_dir=ckpt)
    assert run_state.list_checkpoints(run_dir) == [first]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [first.name]
    assert torch.equal(ShardedCheckpoint(first / "sharded").read(["w"])["w"], WHOLE)



def test_background_saves_write_what_the_step_held(runs, tmp_path, monkeypatch):
    """``train.async_checkpoint``: each checkpoint holds its own step's state although
    training went on while it was written (slowed down here so that the next step runs
    first), the same as the synchronous run's, and the run ends with the last one on disk."""
    real = run_state.save_sharded_checkpoint

    def slow(**kwargs):
        time.sleep(1.0)
        return real(**kwargs)

    monkeypatch.setattr(run_state, "save_sharded_checkpoint", slow)
    cfg = _config(tmp_path, "async", train={**SETTINGS["train"], "async_checkpoint": True})
    cfg.tokenizer.path = str(runs / "hf" / "tokenizer")
    trainer = Trainer(cfg, quiet=True)
    summary = trainer.run()
    trainer.close()
    assert summary.checkpoint == tmp_path / "async" / "checkpoints" / "step-00000002"
    for step in (1, 2):
        name = f"checkpoints/{run_state.step_dir_name(step)}"
        ours, sync = tmp_path / "async" / name, runs / "sharded" / name
        a, b = ShardedCheckpoint(ours / "sharded"), ShardedCheckpoint(sync / "sharded")
        assert list(a.shapes()) == list(b.shapes())
        for key in a.shapes():
            assert torch.equal(a.read([key])[key], b.read([key])[key]), (step, key)
        state = "training/trainer_state.json"
        assert (ours / state).read_text() == (sync / state).read_text()
