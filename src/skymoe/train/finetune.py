"""The fine-tuning parts of a run's set-up: the model it starts from, its LoRA model and what
a LoRA run's checkpoints hold (its SFT data: ``train.run_data``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_model
from ..errors import ConfigError
from ..model.fp8 import Fp8Experts, Fp8Linear
from ..model.lora import LoRAConfig, add_lora
from ..model.moe import MoEBlock
from ..model.transformer import SkyworkForCausalLM
from . import run_state
from .config import TrainConfig


def starting_checkpoint(path: Path) -> Path:
    """``model.init_from`` as a checkpoint directory: itself, or a run directory's latest
    checkpoint (an HF-format one; a sharded one must be exported first)."""
    if not (path / run_state.CHECKPOINTS).is_dir():
        return path
    latest = run_state.latest_checkpoint(path)
    if latest is None:
        raise ConfigError(f"model.init_from = {path}: a run directory without a checkpoint")
    if run_state.is_sharded(latest):
        raise ConfigError(f"model.init_from = {path}: its latest checkpoint {latest} is "
                          f"sharded; write it as an HF directory first (skymoe export "
                          f"{latest} OUT) and start from OUT")
    return latest


def lora_model(cfg: TrainConfig, device: torch.device) -> tuple[SkyworkForCausalLM, str]:
    """The frozen ``model.init_from`` base (bf16, fp32, or its FP8 values kept at one byte)
    with fresh adapters, the same on every rank (seeded by ``train.seed``), and a line saying
    what trains."""
    lora = cfg.lora
    path = cfg.model.init_from
    if lora.base_dtype == "fp8":
        model = load_model(path, dtype=torch.bfloat16, device=device, fp8="keep")
        if not any(isinstance(m, (Fp8Linear, Fp8Experts)) for m in model.modules()):
            raise ConfigError(f"lora.base_dtype = 'fp8' needs an FP8 checkpoint; {path} is not "
                              f"one (write one with skymoe quantize {path} OUT --to fp8)")
    else:
        dtype = torch.bfloat16 if lora.base_dtype == "bf16" else torch.float32
        model = load_model(path, dtype=dtype, device=device)
    adapted = add_lora(model, LoRAConfig(
        rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets),
        train_router=lora.train_router), seed=cfg.train.seed)
    if lora.train_router:  # AdamW updates on fp32 weights, whatever the base (it routes in fp32)
        for module in model.modules():
            if isinstance(module, MoEBlock):
                module.gate.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, (f"LoRA rank {lora.rank} on {len(adapted)} modules of a {lora.base_dtype} "
                   f"base: {trainable:,} trainable of {total:,} parameters")


def lora_state_names(model: torch.nn.Module) -> set[str]:
    """The names a LoRA run's checkpoint holds: what trains (the adapters, a trained router)
    and the buffers training changes (routing biases), not the frozen base (an FP8 base's
    values and scales are buffers too), which ``model.init_from`` gives again."""
    base = {f"{prefix}.{name}" for prefix, module in model.named_modules()
            if isinstance(module, (Fp8Linear, Fp8Experts))
            for name, _ in module.named_buffers(recurse=False)}
    return ({n for n, p in model.named_parameters() if p.requires_grad}
            | {n for n, _ in model.named_buffers() if n not in base})


__all__ = ["lora_model", "lora_state_names", "starting_checkpoint"]
