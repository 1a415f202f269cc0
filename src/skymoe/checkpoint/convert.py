"""Writing a converted checkpoint (upcycled, quantized) safely: streamed, shard by shard, into a
hidden sibling directory renamed into place at the end, with the tokenizer files copied."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from ..config import SkyworkMoeConfig
from ..errors import CheckpointError
from . import io
from .tokenizer import TOKENIZER_FILES

TensorStream = Iterable[tuple[str, torch.Tensor]]


def write_converted(src_dir: Path, out_dir: Path, config: SkyworkMoeConfig,
                    tensors: Callable[[tqdm], TensorStream], max_shard_bytes: int,
                    overwrite: bool = False, show_progress: bool | None = None,
                    desc: str = "convert") -> Path:
    """Write ``tensors(progress)`` (which reports the source bytes it read to ``progress``),
    ``config`` and ``src_dir``'s tokenizer files as the checkpoint ``out_dir``.

    A failure or an interruption never leaves an output that looks complete; an existing
    ``out_dir`` is refused unless ``overwrite``.
    """
    total = sum(f.stat().st_size for f in io.weight_files(src_dir))

    def write(tmp: Path) -> None:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{desc} (read)",
                  disable=(not show_progress) if show_progress is not None else None) as bar:
            io.write_sharded(tensors(bar), tmp, max_shard_bytes)

    return publish_checkpoint(src_dir, out_dir, config, write, overwrite)


def publish_checkpoint(src_dir: Path, out_dir: Path, config: SkyworkMoeConfig | None,
                       write_weights: Callable[[Path], None], overwrite: bool = False) -> Path:
    """``write_weights(tmp)``, then ``config`` (if any) and ``src_dir``'s tokenizer files, into
    a hidden sibling of ``out_dir`` renamed into place at the end: a failure or an interruption
    never leaves an output that looks complete; an existing ``out_dir`` is refused unless
    ``overwrite``."""
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; pass --overwrite to replace it")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_weights(tmp)
        if config is not None:
            config.save(tmp)
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, tmp / name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
