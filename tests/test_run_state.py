"""Training checkpoints: exact resume, atomic saves that survive ``kill -9``, pruning, errors.

A small MoE model (the tiny preset shrunk) keeps every test fast; the subprocess tests pay one
Python + torch start-up each.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import skymoe
from skymoe import CheckpointError, SkyworkMoeConfig, build_model
from skymoe.checkpoint import load_tokenizer, save_byte_tokenizer
from skymoe.train.run_state import (latest_checkpoint, list_checkpoints, load_checkpoint,
                                        save_checkpoint)

ROOT = Path(__file__).resolve().parents[1]


def _config_dict(**overrides) -> dict:
    raw = json.loads((ROOT / "src/skymoe/configs/tiny.json").read_text())
    raw.update(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_experts=[4],
               max_position_embeddings=64, torch_dtype="float32")
    raw.update(overrides)
    return raw


def _config(**overrides) -> SkyworkMoeConfig:
    return SkyworkMoeConfig.from_hf_dict(_config_dict(**overrides))


def _model(seed: int = 0, **overrides) -> skymoe.SkyworkForCausalLM:
    return build_model(_config(**overrides), dtype=torch.float32, seed=seed)


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train_step(model, optimizer) -> None:
    # Data drawn from the global RNG: a resumed run only sees the same batch if the RNG is back.
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _assert_same_params(a, b) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


def _assert_same_tree(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _trained(steps: int = 2):
    torch.manual_seed(123)
    model = _model(seed=0)
    opt = _optimizer(model)
    for _ in range(steps):
        _train_step(model, opt)
    return model, opt


STATE = {"step": 2, "scheduler": {"last_epoch": 2, "base_lrs": [0.01]},
         "data": {"shard": 3, "offset": 4096}, "aux": {"coef": 0.01, "history": [1.5, 1.25]}}


# ------------------------------------------------------------------------------- round trip
def test_round_trip_is_exact(tmp_path):
    model, opt = _trained()
    random.seed(7)
    np.random.seed(7)
    path = save_checkpoint(tmp_path, 2, model, opt, STATE)
    assert path == tmp_path / "checkpoints" / "step-00000002"
    after_save = (torch.rand(4), random.random(), np.random.rand())  # what an unkilled run draws

    fresh = _model(seed=1)
    fresh_opt = _optimizer(fresh)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    torch.manual_seed(999)  # scramble the RNGs: the load must put them back
    random.seed(999)
    np.random.seed(999)
    state = load_checkpoint(path, fresh, fresh_opt)

    assert torch.equal(torch.rand(4), after_save[0])
    assert random.random() == after_save[1] and np.random.rand() == after_save[2]
    assert state == STATE
    _assert_same_params(model, fresh)
    _assert_same_tree(opt.state_dict(), fresh_opt.state_dict())
    assert fresh_opt.state_dict()["state"][0]["step"].item() == 2


def test_resumed_training_continues_identically(tmp_path):
    """Weights, Adam moments, step counts and RNG together: the next step matches bit for bit."""
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 2, model, opt, {"step": 2})
    _train_step(model, opt)  # the uninterrupted run

    fresh = _model(seed=5)
    fresh_opt = _optimizer(fresh)
    load_checkpoint(path, fresh, fresh_opt)
    _train_step(fresh, fresh_opt)  # the resumed run
    _assert_same_params(model, fresh)


def test_checkpoint_is_an_hf_directory(tmp_path):
    tok = tmp_path / "tok"
    save_byte_tokenizer(tok)
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "run", 2, model, opt, {"step": 2}, tokenizer_dir=tok)
    loaded = skymoe.load_model(path)
    assert loaded.dtype == torch.float32  # fp32 master weights, not the config's bf16
    _assert_same_params(model, loaded)
    assert load_tokenizer(path).encode("hi") == load_tokenizer(tok).encode("hi")
    assert (path / "tokenizer_config.json").read_bytes() == (tok / "tokenizer_config.json").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "skymoe", "generate", str(path), "--prompt", "a",
                           "--max-new-tokens", "3"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_tokenizer_dir_without_tokenizer_fails_before_writing(tmp_path):
    model, opt = _trained(0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        save_checkpoint(tmp_path / "run", 1, model, opt, {}, tokenizer_dir=tmp_path / "empty")
    assert list_checkpoints(tmp_path / "run") == []
    assert not any((tmp_path / "run").rglob(".tmp-*"))


def test_unserializable_state_leaves_nothing(tmp_path):
    model, opt = _trained(0)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model, opt, {"step": object()})
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


# ---------------------------------------------------------------------- pruning, same step
def _steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run)]


def test_keep_last_prunes_oldest(tmp_path):
    model, opt = _trained(0)
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=2)
    assert _steps(tmp_path) == [40, 50]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000050"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000040", "step-00000050"]  # no leftovers of the deletions
    # An older step saved after newer ones (a rollback) is never deleted on its own save.
    save_checkpoint(tmp_path, 5, model, opt, {"step": 5}, keep_last=2)
    assert _steps(tmp_path) == [5, 50]


def test_keep_last_zero_keeps_all_and_steps_sort_numerically(tmp_path):
    model, opt = _trained(0)
    for step in (100_000_000, 9, 99_999_999):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=0)
    assert _steps(tmp_path) == [9, 99_999_999, 100_000_000]


def test_same_step_twice_replaces(tmp_path):
    model, opt = _trained(0)
    first = save_checkpoint(tmp_path, 7, model, opt, {"step": 7, "v": 1})
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    second = save_checkpoint(tmp_path, 7, model, opt, {"step": 7, "v": 2})
    assert first == second and _steps(tmp_path) == [7]
    fresh = _model(seed=3)
    assert load_checkpoint(second, fresh)["v"] == 2
    _assert_same_params(model, fresh)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000007"]


def test_stale_tmp_dirs_swept_but_live_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not _alive(pid))
    stale = root / f".tmp-step-00000003-{dead}"
    mine = root / f".tmp-step-00000004-{os.getpid()}"  # e.g. a restarted container's same pid
    live = root / f".tmp-step-00000005-{os.getppid()}"  # another process saving right now
    for d in (stale, mine, live):
        (d / "training").mkdir(parents=True)
    model, opt = _trained(0)
    save_checkpoint(tmp_path, 6, model, opt, {})
    assert not stale.exists() and not mine.exists() and live.exists()
    assert _steps(tmp_path) == [6]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ------------------------------------------------------------------------------ kill -9
CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from skymoe import SkyworkMoeConfig, build_model
    from skymoe.checkpoint import io
    from skymoe.train import run_state as ck

    run, point = Path(sys.argv[1]), sys.argv[2]
    config = SkyworkMoeConfig.from_hf_dict(json.loads(sys.argv[3]))
    model = build_model(config, dtype=torch.float32, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    ck.save_checkpoint(run, 1, model, opt, {"step": 1})
    print("SAVED-1", flush=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def hang(*args, **kwargs):
        (run / "HANGING").write_text("x")
        time.sleep(600)

    if point == "weights":  # mid-way through the weights of step 2
        write_shard = io._write_shard
        def slow(*args, **kwargs):
            out = write_shard(*args, **kwargs)
            hang()
            return out
        io._write_shard = slow
    else:  # everything written and fsynced, just before the rename
        ck._install = hang
    ck.save_checkpoint(run, 2, model, opt, {"step": 2})
""")


@pytest.mark.parametrize("point", ["weights", "rename"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, point):
    run = tmp_path / "run"
    run.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), point,
                              json.dumps(_config_dict())], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run / "HANGING").exists():
            assert child.poll() is None, f"child exited early: {child.communicate()}"
            assert time.monotonic() < deadline, "child never reached the save of step 2"
            time.sleep(0.05)
        tmp = run / "checkpoints" / f".tmp-step-00000002-{child.pid}"
        assert tmp.is_dir()
        if point == "rename":
            assert (tmp / "training" / "trainer_state.json").is_file()
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # The half-written (or unpublished) step 2 is invisible; step 1 loads exactly.
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000001"
    assert list_checkpoints(run) == [run / "checkpoints" / "step-00000001"]
    fresh = _model(seed=4)
    assert load_checkpoint(latest_checkpoint(run), fresh, _optimizer(fresh)) == {"step": 1}
    _assert_same_params(_model(seed=0), fresh)

    # The next save sweeps the killed process's temporary directory.
    save_checkpoint(run, 3, fresh, _optimizer(fresh), {"step": 3})
    assert not tmp.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000003"]


# --------------------------------------------------------------------------------- errors
@pytest.fixture()
def saved(tmp_path) -> Path:
    model, opt = _trained(1)
    return save_checkpoint(tmp_path, 1, model, opt, {"step": 1})


def _load_fresh(path: Path) -> None:
    """Load into a fresh model + optimizer; a failed load must leave the model untouched (every
    file is checked before anything is modified)."""
    model = _model(seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_checkpoint(path, model, _optimizer(model))
    except CheckpointError:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), \
            "a failed load modified the model"
        raise


def test_missing_trainer_state(saved):
    (saved / "training" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"not a training checkpoint .*trainer_state\.json"):
        _load_fresh(saved)


def test_plain_hf_dir_is_not_a_training_checkpoint(tmp_path):
    path = skymoe.save_model(_model(), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(path, _model())


def test_corrupt_trainer_state(saved):
    (saved / "training" / "trainer_state.json").write_text('{"step": 1,')
    with pytest.raises(CheckpointError, match=r"trainer_state\.json"):
        _load_fresh(saved)


def test_truncated_optimizer(saved):
    f = saved / "training" / "optimizer.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as exc:
        _load_fresh(saved)
    msg = str(exc.value)
    assert str(f) in msg and "\n" not in msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_optimizer_with_arbitrary_objects_is_refused(saved):
    f = saved / "training" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused.*system"):
        _load_fresh(saved)


def test_missing_optimizer_only_matters_when_asked(saved):
    (saved / "training" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: missing"):
        _load_fresh(saved)
    assert load_checkpoint(saved, _model(seed=2)) == {"step": 1}


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        _load_fresh(saved)


def test_corrupt_rng(saved):
    (saved / "training" / "rng.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"rng\.pt"):
        _load_fresh(saved)


def test_architecture_mismatch_is_refused(saved):
    model = _model(num_experts_per_tok=1)  # same shapes, different routing
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        load_checkpoint(saved, model)


# ------------------------------------------------------------------------------- disk full
@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs (a real file system that fills up); skipped where mounting is not
    allowed (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_keeps_earlier_checkpoints_and_says_how_much_space(small_disk):
    model, opt = _trained()
    need = sum(p.numel() * 4 for p in model.parameters()) * 3  # weights + two AdamW moments
    assert 512 * 1024 < need < 1024 * 1024  # one checkpoint fits in 1 MiB, two do not
    first = save_checkpoint(small_disk, 2, model, opt, STATE)
    _train_step(model, opt)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(small_disk, 3, model, opt, {**STATE, "step": 3})
    message = str(err.value)
    assert "not enough space" in message and "step-00000002, is intact" in message
    assert "\n" not in message
    # Nothing half-written is left; the first checkpoint still loads.
    assert [p.name for p in (small_disk / "checkpoints").iterdir()] == [first.name]
    assert load_checkpoint(first, _model(seed=1), _optimizer(_model(seed=1)))["step"] == 2
    subprocess.run(["mount", "-o", "remount,size=4M", str(small_disk)], check=True)
    assert save_checkpoint(small_disk, 3, model, opt, {**STATE, "step": 3}).name == \
        "step-00000003"
