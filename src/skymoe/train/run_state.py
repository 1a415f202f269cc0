"""Training checkpoints that lose nothing: weights, optimizer, RNG and trainer state, atomically.

A checkpoint is ``RUN_DIR/checkpoints/step-00000120/``:

- a complete HF model directory (``config.json`` + safetensors, in the model's own dtype, normally
  fp32 master weights, so a resume is exact) that ``skymoe.load_model`` and ``skymoe generate``
  read directly, plus the tokenizer files copied from the caller's ``tokenizer_dir``;
- ``training/optimizer.pt``: ``optimizer.state_dict()``;
- ``training/rng.pt``: torch CPU RNG state, CUDA RNG states (when CUDA is initialized) and the
  global ``random`` / ``numpy.random`` states;
- ``training/trainer_state.json``: the caller's dict (step, scheduler, data position, ...).

Everything is written into a fresh ``checkpoints/.tmp-step-XXXXXXXX-<pid>`` directory, fsynced,
and renamed into place, so a checkpoint named ``step-*`` is always complete: a crash or
``kill -9`` at any moment leaves the previous checkpoints untouched and, at worst, a ``.tmp-*``
directory that the next save removes. ``.pt`` files are only ever read with
``weights_only=True``: loading a checkpoint never unpickles arbitrary objects.

A *sharded* checkpoint (``save_sharded_checkpoint``, multi-process runs) has ``config.json``,
the tokenizer and ``training/`` as above, minus ``optimizer.pt``, and instead of the weights a
``sharded/`` directory that every rank wrote its own pieces of the weights and AdamW moments
into (torch.distributed.checkpoint; ``skymoe.parallel.sharded_state``). It is published the same
way: all ranks write into one temporary directory, rank 0 renames it once every rank is done.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from ..checkpoint.dcp import Piece, save_pieces
from ..checkpoint.hf import load_weights, save_model
from ..checkpoint.io import pickle_refusal
from ..checkpoint.tokenizer import TOKENIZER_FILES
from ..config import SkyworkMoeConfig
from ..errors import CheckpointError, ConfigError, describe_os_error
from ..model.transformer import SkyworkForCausalLM

CHECKPOINTS = "checkpoints"
TRAINING = "training"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
SHARDED = "sharded"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_DIR = re.compile(r"^\.tmp-.*-(\d+)$")  # every temporary name ends with the writer's pid
# Config fields that change what the model computes: resuming into a model that differs in one
# of them would train silently on a different architecture.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_size", "rope_theta",
                "rms_norm_eps", "sliding_window", "hidden_act", "tie_word_embeddings",
                "num_experts", "num_experts_per_tok", "moe_expert_interval",
                "moe_use_logits_norm", "moe_gate_norm_std", "moe_2layer_gate",
                "moe_feature_no_mul_topk")

# Temporary directories this process is writing right now: the stale-directory sweep must not
# delete them even though they carry this process's pid (a previous incarnation of a restarted
# container often had the same pid, so "my pid" alone does not mean "in progress").
_IN_PROGRESS: set[Path] = set()
_LOCK = threading.Lock()


def step_dir_name(step: int) -> str:
    """``step-00000120``: zero-padded so names sort like steps (wider past 99,999,999)."""
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------------- saving
def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | dict[str, Any],
                    trainer_state: dict[str, Any],
                    tokenizer_dir: str | Path | None = None, keep_last: int = 3) -> Path:
    """Atomically write checkpoint ``RUN_DIR/checkpoints/step-XXXXXXXX`` and return its path.

    The weights (HF directory in the model's dtype), tokenizer files from ``tokenizer_dir``,
    optimizer state (an optimizer, or its ``state_dict()``), RNG states and ``trainer_state`` (a JSON-serializable dict) are written to
    a temporary directory, fsynced and renamed into place; a checkpoint of the same step is
    replaced. Afterwards the oldest checkpoints beyond ``keep_last`` (``<= 0``: keep all; the
    one just written is never removed) and temporary directories left by killed savers are
    deleted.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    # Capture the RNG first so the saved state is exactly the caller's, and serialize the state
    # before touching the disk so a non-serializable value fails without leaving anything.
    rng_state = capture_rng()
    state_text = json.dumps(trainer_state, indent=2) + "\n"
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    model = _unwrap(model)

    root = Path(run_dir) / CHECKPOINTS
    created = not root.is_dir()
    root.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_dir(root.parent)
    pid = os.getpid()
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{pid}"
    with _LOCK:
        _IN_PROGRESS.add(tmp)
    try:
        if tmp.exists():  # left by an earlier process that had our pid: never reuse its files
            shutil.rmtree(tmp)
        save_model(model, tmp)
        for src in tokenizer_files:
            shutil.copyfile(src, tmp / src.name)
        training = tmp / TRAINING
        training.mkdir()
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
                   training / OPTIMIZER)
        torch.save(rng_state, training / RNG)
        (training / TRAINER_STATE).write_text(state_text)
        _fsync_tree(tmp)
        _install(tmp, final, root, pid)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError, SafetensorError)):
            needed = _tensor_bytes(model.state_dict()) + _tensor_bytes(
                optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
            raise _save_failed(exc, root, name, needed) from None
        raise
    finally:
        with _LOCK:
            _IN_PROGRESS.discard(tmp)
    _prune(root, final, keep_last, pid)
    return final


def save_sharded_checkpoint(run_dir: str | Path, step: int, pieces: dict[str, Piece],
                            config: SkyworkMoeConfig, trainer_state: dict[str, Any],
                            tokenizer_dir: str | Path | None = None, keep_last: int = 3,
                            group: dist.ProcessGroup | None = None,
                            rng: dict[str, Any] | None = None) -> Path:
    """Atomically write the sharded checkpoint ``RUN_DIR/checkpoints/step-XXXXXXXX``; a
    collective over ``group`` (every rank passes its own ``pieces``; rank 0's
    ``trainer_state`` and RNG states, ``rng`` or this process's now, are kept). Rank 0 publishes it once every rank's pieces
    are on disk, and prunes as ``save_checkpoint`` does; a failure on any rank leaves the
    earlier checkpoints as they were and raises ``CheckpointError`` on every rank."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    distributed = dist.is_available() and dist.is_initialized()
    main = not distributed or dist.get_rank(group) == 0
    rng_state = rng if rng is not None else capture_rng()
    state_text = json.dumps(trainer_state, indent=2) + "\n"
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    root = Path(run_dir) / CHECKPOINTS
    name = step_dir_name(step)
    final = root / name
    pid = _main_pid(group) if distributed else os.getpid()  # one name for every rank's files
    tmp = root / f".tmp-{name}-{pid}"
    failure: BaseException | None = None
    if main:
        with _LOCK:
            _IN_PROGRESS.add(tmp)
        failure = _attempt(lambda: _fresh_directory(root, tmp))
    if _all_ok(failure is None, group):
        failure = _attempt(lambda: save_pieces(pieces, tmp / SHARDED, group))
        if main and failure is None:
            def finish() -> None:
                config.save(tmp)
                for src in tokenizer_files:
                    shutil.copyfile(src, tmp / src.name)
                training = tmp / TRAINING
                training.mkdir()
                torch.save(rng_state, training / RNG)
                (training / TRAINER_STATE).write_text(state_text)
                _fsync_tree(tmp)
                _install(tmp, final, root, pid)
            failure = _attempt(finish)
    ok = _all_ok(failure is None, group)
    if main:
        with _LOCK:
            _IN_PROGRESS.discard(tmp)
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        if failure is None:
            raise CheckpointError(f"{root / name}: another rank could not write its part of "
                                  "the checkpoint (its error is in its log); the earlier "
                                  "checkpoints are intact")
        if isinstance(failure, (OSError, RuntimeError, CheckpointError)):
            needed = sum(p.tensor.numel() * p.tensor.element_size() for p in pieces.values())
            raise _save_failed(failure, root, name, needed) from None
        raise failure
    if main:
        _prune(root, final, keep_last, pid)
    return final


def _attempt(action: Any) -> BaseException | None:
    """Run ``action``; the exception it raised (an ordinary error), or None."""
    try:
        action()
    except Exception as exc:  # reported on every rank once the ranks have agreed
        return exc
    return None


def _all_ok(ok: bool, group: dist.ProcessGroup | None) -> bool:
    """Whether ``ok`` holds on every rank (a collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _main_pid(group: dist.ProcessGroup | None) -> int:
    """Rank 0's process id, on every rank (it names the shared temporary directory)."""
    pid = torch.tensor([os.getpid()], dtype=torch.int64)
    dist.broadcast(pid, src=dist.get_global_rank(group, 0) if group is not None else 0,
                   group=group)
    return int(pid.item())


def _fresh_directory(root: Path, tmp: Path) -> None:
    created = not root.is_dir()
    root.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_dir(root.parent)
    if tmp.exists():  # left by an earlier process that had our pid: never reuse its files
        shutil.rmtree(tmp)
    tmp.mkdir()


def _save_failed(exc: BaseException, root: Path, name: str, needed: int) -> CheckpointError:
    """The error for a save that failed while writing: how much space it needs (``needed``
    bytes) against what is free (a full disk surfaces from torch and safetensors as assorted
    errors), and that the earlier checkpoints are untouched."""
    free = shutil.disk_usage(root).free
    latest = latest_checkpoint(root.parent)
    kept, then = (f"the latest complete checkpoint, {latest.name}, is intact",
                  "continue with skymoe train --resume") if latest else \
        ("no earlier checkpoint exists", "run again")
    if free < needed * 1.05:
        return CheckpointError(
            f"{root / name}: not enough space: the checkpoint needs about "
            f"{needed / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free; {kept}; free space "
            f"(or lower train.keep_last) and {then}")
    detail = describe_os_error(exc) if isinstance(exc, OSError) else _one_line(exc)
    return CheckpointError(f"{root / name}: the checkpoint could not be written ({detail}); "
                           f"{kept}")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list structure."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _install(tmp: Path, final: Path, root: Path, pid: int) -> None:
    """Rename the finished ``tmp`` to ``final``, replacing an existing checkpoint of that step."""
    if final.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside under a
        # temporary name (swept later if we die here), move the new one in, then delete.
        aside = root / f".tmp-old-{final.name}-{pid}"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(aside, final)  # put the old checkpoint back rather than lose both
            raise
        _fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)


def _prune(root: Path, final: Path, keep_last: int, pid: int) -> None:
    """Delete checkpoints beyond ``keep_last`` (never ``final``) and stale temporary dirs."""
    doomed: list[Path] = []
    if keep_last > 0:
        complete = list_checkpoints(root.parent)
        excess = len(complete) - keep_last
        if excess > 0:
            doomed = [p for p in complete if p != final][:excess]
    for old in doomed:
        # Rename first (atomic), delete after: a kill during the deletion then leaves a
        # ``.tmp-*`` directory for the next sweep, never a half-deleted ``step-*`` checkpoint.
        aside = root / f".tmp-del-{old.name}-{pid}"
        try:
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(old, aside)
        except OSError as exc:
            warnings.warn(f"{old}: could not remove an old checkpoint ({exc})", stacklevel=3)
    if doomed:
        _fsync_dir(root)
    for entry in root.iterdir():
        m = _TMP_DIR.match(entry.name)
        if m is None or not entry.is_dir():
            continue
        owner = int(m.group(1))
        with _LOCK:
            busy = entry in _IN_PROGRESS
        # Another live process on this host may be saving right now: leave its directory.
        if busy or (owner != pid and _pid_alive(owner)):
            continue
        try:
            shutil.rmtree(entry)
        except OSError as exc:
            warnings.warn(f"{entry}: could not remove a stale temporary directory ({exc})",
                          stacklevel=3)


def _tokenizer_files(tokenizer_dir: str | Path | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    d = Path(tokenizer_dir)
    files = [d / n for n in TOKENIZER_FILES if (d / n).is_file()]
    # Checked before writing anything: a checkpoint without a tokenizer cannot be generated from.
    if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
        raise CheckpointError(f"{d}: no tokenizer.json or tokenizer.model to copy into the "
                              "checkpoint; pass the directory holding the run's tokenizer "
                              "(or tokenizer_dir=None)")
    return files


def capture_rng() -> dict[str, Any]:
    """This process's random number generator states (torch, Python, CUDA)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        # numpy's legacy global generator: (kind, uint32 key array, pos, has_gauss, gauss);
        # the array is stored as a tensor so the file stays weights_only-loadable.
        kind, key, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                          float(gauss))
    # Only when CUDA is initialized: querying it otherwise would initialize a context for nothing.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _fsync_tree(directory: Path) -> None:
    """fsync every file, then every directory (deepest first), so the data is on disk before the
    rename publishes it; otherwise a power loss could leave a renamed but empty checkpoint."""
    dirs: list[Path] = []
    for current, _, files in os.walk(directory):
        dirs.append(Path(current))
        for f in files:
            fd = os.open(Path(current) / f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _unwrap(model: nn.Module) -> SkyworkForCausalLM:
    """The SkyworkForCausalLM inside ``torch.compile`` / DDP wrappers (their parameter names
    carry prefixes that are not HF names)."""
    m = model
    while not isinstance(m, SkyworkForCausalLM):
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a SkyworkForCausalLM (or a torch.compile/DDP wrapper of "
                            f"one), got {type(model).__name__}")
        m = inner
    return m


# ------------------------------------------------------------------------------------ listing
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``run_dir`` (``checkpoints/step-XXXXXXXX``), ascending by step.

    Temporary directories of saves in progress or killed mid-way are not listed.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step, or None when the run has none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ loading
def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Resume from checkpoint directory ``path``: returns the saved trainer state.

    Fills ``model``'s existing parameters in place (it keeps its device and dtype), loads the
    optimizer state when ``optimizer`` is given, and restores the RNG states. Every file is
    read and checked before the model, optimizer or RNG is modified where possible; a missing
    or corrupt file raises ``CheckpointError`` naming it.
    """
    path = Path(path)
    model = _unwrap(model)
    if is_sharded(path):
        raise CheckpointError(f"{path}: a sharded checkpoint; resume it with skymoe train "
                              "--resume, or write its model as an HF directory with skymoe "
                              "export")
    state, rng = _read_training(path, model.config)
    training = path / TRAINING
    opt_state = read_optimizer_state(training / OPTIMIZER) if optimizer is not None else None
    load_weights(model, path)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{training / OPTIMIZER}: does not match this optimizer "
                                  f"({_one_line(exc)}); build the optimizer over the same "
                                  "parameters and groups as the saved run") from None
    _restore_rng(rng)
    return state


def is_sharded(path: str | Path) -> bool:
    """Whether checkpoint ``path`` was written by ``save_sharded_checkpoint``."""
    return (Path(path) / SHARDED).is_dir()


def resume_state(path: str | Path, config: SkyworkMoeConfig) -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` (either kind), after checking that it holds a
    model of ``config``'s architecture and restoring the RNG states; the weights and the
    optimizer are left to the caller."""
    state, rng = _read_training(Path(path), config)
    _restore_rng(rng)
    return state


def _read_training(path: Path, config: SkyworkMoeConfig) -> tuple[dict[str, Any],
                                                                  dict[str, Any]]:
    """(trainer state, RNG states) of a checkpoint whose architecture matches ``config``."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a training checkpoint such as "
                              f"RUN_DIR/{CHECKPOINTS}/step-00000120)")
    training = path / TRAINING
    state = _read_trainer_state(training / TRAINER_STATE, path)
    rng = _read_rng(training / RNG)
    _check_config(path, config)
    return state, rng


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The trainer state (step, loader, settings such as ``lora``) of training checkpoint
    ``checkpoint``, either kind."""
    checkpoint = Path(checkpoint)
    return _read_trainer_state(checkpoint / TRAINING / TRAINER_STATE, checkpoint)


def _read_trainer_state(file: Path, checkpoint: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{checkpoint}: not a training checkpoint (no {TRAINING}/"
                              f"{TRAINER_STATE}); pass a directory written by save_checkpoint")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{file}: unreadable ({_one_line(exc)}); the checkpoint is corrupt, "
                              "resume from an earlier one") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not the trainer-state "
                              "object; the checkpoint is corrupt, resume from an earlier one")
    return state


def _torch_load(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete, resume from an "
                              "earlier one")
    try:
        # weights_only: a checkpoint is data, never code to execute.
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcodes, refused globals
        raise CheckpointError(f"{file}: {pickle_refusal(exc)}; resume from an earlier "
                              "checkpoint") from None


def read_optimizer_state(file: Path) -> dict[str, Any]:
    """A saved ``optimizer.state_dict()`` (read weights-only), checked for its two keys."""
    state = _torch_load(file)
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise CheckpointError(f"{file}: not an optimizer state_dict (expected keys 'state' and "
                              "'param_groups')")
    return state


def _read_rng(file: Path) -> dict[str, Any]:
    rng = _torch_load(file)
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise CheckpointError(f"{file}: not an RNG state (expected a dict with a 'cpu' tensor)")
    return rng


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in rng:
        import numpy as np
        kind, key, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    cuda = rng.get("cuda")
    # A checkpoint from a GPU run resumed on CPU has nothing to restore there; with fewer GPUs
    # than saved, the first ones get their states.
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _check_config(path: Path, config: SkyworkMoeConfig) -> None:
    try:
        saved = SkyworkMoeConfig.from_json_file(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    diffs = [f"{k} {getattr(saved, k)!r} (model: {getattr(config, k)!r})"
             for k in _ARCH_FIELDS if getattr(saved, k) != getattr(config, k)]
    if diffs:
        raise CheckpointError(f"{path / 'config.json'}: the checkpoint's architecture differs "
                              f"from the model's: {', '.join(diffs)}; build the model from this "
                              "config to resume")


__all__ = ["is_sharded", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "resume_state", "save_checkpoint", "save_sharded_checkpoint", "step_dir_name"]
