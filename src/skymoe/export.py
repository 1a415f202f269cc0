"""``skymoe export CKPT OUT``: a training checkpoint's model as an HF checkpoint directory.

Reads either kind of training checkpoint (sharded, from torch.distributed.checkpoint pieces;
or the HF directory a single-process run writes) or a run directory (its latest checkpoint),
and writes ``config.json``, safetensors shards (+ index) and the tokenizer files, tensor by
tensor: each whole tensor is assembled from its pieces, cast (``dtype``) or quantized to the FP8
convention (``fp8``), and streamed into its shard, so memory holds one tensor at a time. The
optimizer state is left behind. The output appears complete or not at all.

A LoRA run's checkpoint holds its adapters, not a model: it is written as a PEFT adapter
directory (``adapter_model.safetensors``, ``adapter_config.json``) with the run's tokenizer and
chat template, for ``--adapter`` or ``skymoe merge``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from .checkpoint import fp8, io, names
from .checkpoint.adapter import save_adapter
from .checkpoint.convert import publish_checkpoint
from .checkpoint.dcp import ShardedCheckpoint
from .config import SkyworkMoeConfig
from .errors import CheckpointError
from .model.lora import LoRAConfig
from .model.transformer import SkyworkForCausalLM
from .parallel.sharded_state import hf_blocks
from .train import run_state

DEFAULT_SHARD_BYTES = 5 * 10**9
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a training checkpoint, the latest one when it is a run
    directory."""
    path = Path(path)
    if (path / run_state.TRAINING).is_dir() or run_state.is_sharded(path):
        return path
    latest = run_state.latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a training checkpoint (RUN_DIR/checkpoints/"
                              "step-XXXXXXXX) nor a run directory with one")
    return latest


def _source(ckpt: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]],
                                 Callable[[str], torch.Tensor]]:
    """The model tensors of checkpoint ``ckpt`` (HF name -> shape, dtype) and a reader of
    one of them."""
    if run_state.is_sharded(ckpt):
        sharded = ShardedCheckpoint(ckpt / run_state.SHARDED)
        shapes, blocks = {}, {}
        for key, (shape, dtype) in sharded.shapes().items():
            if not key.startswith("optimizer."):
                for name, hf_shape, offsets, sizes in hf_blocks(key, shape):
                    shapes[name], blocks[name] = (hf_shape, dtype), (key, offsets, sizes)
        return shapes, lambda name: sharded.read_block(*blocks[name]).view(shapes[name][0])
    infos = io.tensor_infos(ckpt)

    def read(name: str) -> torch.Tensor:
        with safe_open(str(infos[name][2]), framework="pt") as f:
            return f.get_tensor(name)

    return {k: (shape, dtype) for k, (dtype, shape, _) in infos.items()}, read


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, dtype: str | None = None,
                      to_fp8: bool = False, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      show_progress: bool | None = None) -> Path:
    """Write the model of training checkpoint (or run directory) ``ckpt`` to ``out_dir``:
    in ``dtype`` (default: the checkpoint's), or with ``to_fp8`` the FP8 convention of
    ``skymoe quantize`` (projections e4m3 with per-tensor scales, the rest in ``dtype``)."""
    ckpt, out_dir = resolve_checkpoint(ckpt), Path(out_dir)
    if run_state.is_sharded(ckpt) and "lora" in run_state.read_trainer_state(ckpt):
        if dtype is not None or to_fp8:
            raise CheckpointError(f"{ckpt}: a LoRA run's checkpoint holds adapters, exported "
                                  "as they trained (fp32); drop --dtype/--to, or merge them "
                                  "into the base with skymoe merge")
        return export_adapter(ckpt, out_dir, overwrite)
    if dtype is not None and dtype not in _DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    config = SkyworkMoeConfig.from_json_file(ckpt)
    if "quantization_config" in config.extra:
        raise CheckpointError(f"{ckpt}: already quantized; a training checkpoint holds plain "
                              "weights")
    target = _DTYPES[dtype or config.torch_dtype]
    shapes, read = _source(ckpt)
    with torch.device("meta"):
        order = names.expected_names(SkyworkForCausalLM(config))
    missing = [n for n in order if n not in shapes]
    if missing:
        raise CheckpointError(f"{ckpt}: lacks '{missing[0]}' ({len(missing)} tensors in all); "
                              "the checkpoint is incomplete or belongs to another config")
    specs, produce = _plan(order, shapes, read, target, to_fp8)
    out_config = dataclasses.replace(config, torch_dtype=dtype or config.torch_dtype)
    if to_fp8:
        out_config = dataclasses.replace(out_config, extra={
            **out_config.extra, "quantization_config": dict(fp8.QUANTIZATION_CONFIG)})
    total = sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in specs)

    def write(tmp: Path) -> None:
        with tqdm(total=total, unit="B", unit_scale=True, desc="export",
                  disable=(not show_progress) if show_progress is not None else None) as bar:
            io.write_streamed(specs, produce, tmp, max_shard_bytes, written=bar.update)

    return publish_checkpoint(ckpt, out_dir, out_config, write, overwrite)


def export_adapter(ckpt: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """The adapters (and a trained router) of LoRA checkpoint ``ckpt`` as a PEFT adapter
    directory with the run's tokenizer and chat template."""
    settings = run_state.read_trainer_state(ckpt)["lora"]
    cfg = LoRAConfig(rank=settings["rank"], alpha=settings["alpha"],
                     dropout=settings["dropout"], targets=tuple(settings["targets"]),
                     train_router=settings["train_router"])
    config = SkyworkMoeConfig.from_json_file(ckpt)
    sharded = ShardedCheckpoint(ckpt / run_state.SHARDED)
    keys = [k for k in sharded.shapes() if not k.startswith("optimizer.")
            and (".lora." in k or (cfg.train_router and ".gate." in k))]
    # Adapters are small: read whole. The experts' w13_B comes stacked as [E, 2, F, r].
    tensors = {k: t.flatten(1, 2) if t.dim() == 4 else t for k, t in sharded.read(keys).items()}
    return publish_checkpoint(ckpt, out_dir, None, lambda tmp: save_adapter(
        tensors, tmp, cfg, config.model_type, base=settings.get("base", "")), overwrite)


def _plan(order: list[str], shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
          read: Callable[[str], torch.Tensor], target: torch.dtype, to_fp8: bool
          ) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]],
                     Callable[[str], torch.Tensor]]:
    """The output tensors (name, shape, dtype) in order, and the function making each: an
    FP8 weight is quantized once and its scale kept for the entry that follows it."""
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name in order:
        shape = shapes[name][0]
        if to_fp8 and fp8.is_quantizable(name):
            specs += [(name, shape, fp8.FP8_DTYPE), (name + "_scale", (), torch.float32)]
        else:
            specs.append((name, shape, target if shapes[name][1].is_floating_point
                          else shapes[name][1]))
    scales: dict[str, torch.Tensor] = {}

    def produce(name: str) -> torch.Tensor:
        if name in scales:
            return scales.pop(name)
        t = read(name)
        if to_fp8 and fp8.is_quantizable(name):
            q, scales[name + "_scale"] = fp8.quantize(t)
            return q
        return t.to(target) if t.is_floating_point() else t

    return specs, produce


__all__ = ["export_checkpoint", "resolve_checkpoint"]
