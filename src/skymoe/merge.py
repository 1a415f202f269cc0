"""``skymoe merge BASE ADAPTER OUT``: a LoRA adapter folded into its base, as an HF checkpoint.

The base is loaded in its own dtype (an FP8 base widened to bf16, exactly), the adapter added
and checked against it by name and shape, every delta ``scale * B @ A`` added in fp32 and cast
back, and the result written as an HF directory (or re-quantized to the FP8 convention of
``skymoe quantize``). The tokenizer and chat template come from the adapter directory when it
has them (a fine-tuned run's), else from the base. The model is held in memory once (its bytes
in the base's dtype); the output appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from .checkpoint import load_model, save_model
from .checkpoint.adapter import load_adapter
from .checkpoint.convert import publish_checkpoint
from .errors import CheckpointError
from .model.lora import merge_lora
from .quantize import quantize_checkpoint


def merge_adapter(base: str | Path, adapter: str | Path, out_dir: str | Path,
                  to_fp8: bool = False, overwrite: bool = False) -> Path:
    """Write ``base`` with ``adapter`` merged to ``out_dir`` (FP8 with ``to_fp8``)."""
    base, adapter, out_dir = Path(base), Path(adapter), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; pass --overwrite to replace it")
    model = load_model(base, fp8="dequantize")
    load_adapter(model, adapter, model.config.model_type)
    merge_lora(model)
    extra = {k: v for k, v in model.config.extra.items() if k != "quantization_config"}
    model.config = dataclasses.replace(model.config, extra=extra)
    tokenizer_from = adapter if any((adapter / f).is_file() for f in
                                    ("tokenizer.json", "tokenizer.model")) else base
    if not to_fp8:
        return publish_checkpoint(tokenizer_from, out_dir, None,
                                  lambda tmp: save_model(model, tmp), overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=out_dir.parent))
    try:
        publish_checkpoint(tokenizer_from, staging / "merged", None,
                           lambda tmp: save_model(model, tmp))
        return quantize_checkpoint(staging / "merged", out_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["merge_adapter"]
