"""``load_model`` / ``save_model`` for HF checkpoint directories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import SkyworkMoeConfig
from ..errors import CheckpointError
from ..model.fp8 import keeps_fp8_values, use_fp8_modules
from ..model.transformer import SkyworkForCausalLM
from . import fp8 as fp8_format
from . import io, names

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def load_model(path: str | Path, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", expert_impl: str | None = None,
               fp8: str = "auto") -> SkyworkForCausalLM:
    """Load an HF checkpoint directory (Skywork-MoE, Mixtral or Llama) as a skymoe model.

    The model is created without memory (meta device), materialized once on ``device``, and
    filled shard by shard, so peak memory is the model plus one tensor being read. ``dtype``
    defaults to the config's ``torch_dtype``.

    FP8 checkpoints (``quantization_config.quant_method == "fp8"``): with ``fp8="auto"`` the
    projections become FP8 modules holding the stored values (one byte each on sm_89+ GPUs,
    which then multiply in FP8; widened to bf16, exactly, elsewhere), so the model re-saves
    without loss; ``"keep"`` keeps one byte per value on any device that can hold FP8
    tensors (``ConfigError`` elsewhere). ``"dequantize"``, and
    checkpoints with block scales or per-channel expert scales, load plain weights
    ``q * scale`` instead.
    """
    if fp8 not in fp8_format.FP8_MODES:
        raise ValueError(f"fp8 must be one of {fp8_format.FP8_MODES}, not {fp8!r}")
    path = Path(path)
    config = SkyworkMoeConfig.from_json_file(path)
    io.weight_files(path)  # fail on a directory without weights before allocating the model
    dtype = dtype or config.dtype
    with torch.device("meta"):
        model = SkyworkForCausalLM(config).to(dtype)  # cast while still free: one allocation
    quant = config.extra.get("quantization_config")
    if (fp8 != "dequantize" and isinstance(quant, dict) and quant.get("quant_method") == "fp8"
            and fp8_format.block_size_of(quant) is None):
        per_channel, block_scaled = _fp8_scales(path)
        if not block_scaled and not any(".experts." in name for name in per_channel):
            keep = keeps_fp8_values(fp8, torch.device(device))
            with torch.device("meta"):
                use_fp8_modules(model, per_channel, keep_fp8=keep)
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, path)
    if expert_impl:
        model.set_expert_impl(expert_impl)
    model.eval()
    return model


def _fp8_scales(path: Path) -> tuple[set[str], bool]:
    """From the headers: the layers whose FP8 scale is per output channel ([out, 1] or [out]),
    and whether any weight has block scales (``weight_scale_inv``)."""
    infos = io.tensor_infos(path)
    per_channel = {name[: -len(".weight_scale")] for name, (_, shape, _) in infos.items()
                   if name.endswith(".weight_scale") and len(shape) >= 1 and shape[0] > 1}
    return per_channel, any(name.endswith(".weight_scale_inv") for name in infos)


def load_weights(model: SkyworkForCausalLM, path: str | Path) -> SkyworkForCausalLM:
    """Fill the parameters of an existing ``model`` from the HF checkpoint directory ``path``.

    The model keeps its device, dtype, train/eval mode and expert implementation; every tensor is
    checked (known name, shape, floating dtype) and copied in place, so optimizer references to
    the parameters stay valid (this is how a training run resumes). Raises ``CheckpointError``
    for an unknown or mis-shaped tensor or when the checkpoint lacks some of the model's weights.
    """
    path = Path(path)
    config = model.config
    files = io.weight_files(path)
    params = {**dict(model.named_parameters(remove_duplicate=False)),
              **dict(model.named_buffers())}  # FP8 modules keep values and scales as buffers
    missing = set(names.expected_names(model))
    scales = io.read_tensors(files, lambda n: n.endswith((".weight_scale", ".weight_scale_inv")))
    block = fp8_format.block_size_of(config.extra.get("quantization_config"))
    dequantized = False
    with torch.no_grad():
        for file in files:
            for name, tensor in io.iter_tensors(file):
                if names.is_ignored(name):
                    continue
                target = names.resolve(name, params)
                if fp8_format.is_scale(name):
                    if target is not None:  # a scale the model's FP8 modules keep
                        target.copy_(_scale_like(file, name, tensor, target))
                        missing.discard(name)
                    continue  # used for dequantizing below, or an activation scale
                if target is None:
                    raise CheckpointError(
                        f"{file}: tensor '{name}' does not belong to a {config.model_type} model "
                        f"with {config.num_hidden_layers} layers and {config.num_experts} experts "
                        "(check config.json against the weights)")
                if tensor.dtype in _FP8_DTYPES and names.resolve(name + "_scale", params) \
                        is None:
                    tensor = _dequantize(file, name, tensor, scales, block)
                    dequantized = True
                _check_tensor(file, name, tensor, target)
                target.copy_(tensor)
                missing.discard(name)
    if dequantized:  # the model now holds plain weights: saving it writes no FP8
        config.extra.pop("quantization_config", None)
    if missing:
        first = sorted(missing)[0]
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, "
                              f"e.g. '{first}'; the weights are incomplete or belong to another "
                              "config")
    return model


def _dequantize(file: Path, name: str, q: torch.Tensor, scales: dict[str, torch.Tensor],
                block: list[int] | None) -> torch.Tensor:
    """An FP8 weight in fp32 (exact: every e4m3 value times its fp32 scale)."""
    if name + "_scale" in scales:
        return fp8_format.dequantize(name, q, scales[name + "_scale"])
    if name + "_scale_inv" in scales:
        if block is None:
            raise CheckpointError(f"{file}: '{name}' has a block scale (weight_scale_inv) but "
                                  "config.json has no quantization_config.weight_block_size")
        return fp8_format.dequantize(name, q, scales[name + "_scale_inv"], block)
    raise CheckpointError(f"{file}: FP8 tensor '{name}' has no '{name}_scale' (or "
                          "'_scale_inv') in the checkpoint; it cannot be dequantized")


def _scale_like(file: Path, name: str, scale: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
    """An FP8 scale reshaped to the module's buffer ([] and [1] are both per tensor)."""
    if scale.numel() != target.numel():
        raise CheckpointError(f"{file}: scale '{name}' has shape {list(scale.shape)}, the model "
                              f"expects {list(target.shape)}")
    return scale.float().reshape(target.shape)


def _check_tensor(file: Path, name: str, tensor: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{file}: tensor '{name}' has shape {list(tensor.shape)}, the "
                              f"config expects {list(target.shape)}")
    if tensor.dtype in _FP8_DTYPES and target.dtype in (*_FP8_DTYPES, torch.bfloat16):
        return  # FP8 values into an FP8 module: kept, or widened exactly
    if tensor.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor '{name}' has dtype {tensor.dtype}; expected a "
                              "floating-point weight (float32, bfloat16 or float16)")


def save_model(model: SkyworkForCausalLM, path: str | Path, model_type: str | None = None,
               max_shard_bytes: int = io.DEFAULT_SHARD_BYTES) -> Path:
    """Write ``config.json`` and sharded safetensors (+ index) with the exact HF tensor names.

    ``model_type`` overrides the config's flavour (``"mixtral"`` writes a checkpoint that
    transformers' MixtralForCausalLM loads). Returns the directory.
    """
    path = Path(path)
    config = model.config
    dtype_name = {v: k for k, v in {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                    "float16": torch.float16}.items()}.get(model.dtype)
    if dtype_name is None:
        raise CheckpointError(f"cannot save a model in {model.dtype}; convert it to float32, "
                              "bfloat16 or float16 first")
    to_write = dataclasses.replace(config, torch_dtype=dtype_name)
    to_write.to_hf_dict(model_type)  # validate the flavour before writing any weights
    io.write_sharded(names.hf_tensors(model), path, max_shard_bytes)
    to_write.save(path, model_type)
    return path
