"""``skymoe quantize IN OUT --fp8``: write the Skywork-MoE-Base-FP8 / vLLM ``"fp8"`` checkpoint.

Every attention, expert and MLP projection becomes ``float8_e4m3fn`` with one fp32
``weight_scale`` per tensor (per expert per matrix for experts); router, embeddings, LM head and
norms are copied unchanged; ``quantization_config = {"quant_method": "fp8",
"activation_scheme": "dynamic"}`` goes into config.json. Streamed tensor by tensor, one output
shard in memory at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from .checkpoint import fp8, io, names
from .checkpoint.convert import write_converted
from .config import SkyworkMoeConfig
from .errors import CheckpointError

DEFAULT_SHARD_BYTES = 5 * 10**9


def fp8_tensors(src_dir: Path, progress: tqdm | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """The FP8 checkpoint's tensors, in the source's order, each quantizable weight followed by
    its ``weight_scale``."""
    for file in io.weight_files(src_dir):
        for name, tensor in io.iter_tensors(file):
            if progress is not None:
                progress.update(tensor.numel() * tensor.element_size())
            if names.is_ignored(name):
                continue
            if fp8.is_scale(name) or tensor.dtype in (fp8.FP8_DTYPE, torch.float8_e5m2):
                raise CheckpointError(f"{file}: '{name}' is already quantized; quantize the "
                                      "original bf16/fp32 checkpoint")
            if fp8.is_quantizable(name):
                q, scale = fp8.quantize(tensor)
                yield name, q
                yield name + "_scale", scale
            else:
                yield name, tensor


def quantize_checkpoint(src_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        show_progress: bool | None = None) -> Path:
    """Write the FP8 version of the HF checkpoint ``src_dir`` to ``out_dir`` (atomically)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not (src_dir / "config.json").is_file():
        raise CheckpointError(f"{src_dir}: no config.json; expected an HF checkpoint directory")
    config = SkyworkMoeConfig.from_json_file(src_dir)
    if "quantization_config" in config.extra:
        raise CheckpointError(f"{src_dir}: config.json already has a quantization_config; "
                              "quantize the original checkpoint")
    out_config = dataclasses.replace(
        config, extra={**config.extra, "quantization_config": dict(fp8.QUANTIZATION_CONFIG)})
    return write_converted(src_dir, out_dir, out_config, lambda bar: fp8_tensors(src_dir, bar),
                           max_shard_bytes, overwrite, show_progress, desc="quantize")
