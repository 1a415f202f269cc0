"""The fine-tuning parts of a run's set-up: the model it starts from, its SFT data (with the
chat template the run trains on) and its LoRA model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_model, load_tokenizer
from ..checkpoint.chat_template import TEMPLATE_FILE, ChatTemplate
from ..checkpoint.tokenizer import TOKENIZER_FILES, Tokenizer
from ..errors import ConfigError
from ..model.fp8 import Fp8Experts, Fp8Linear
from ..model.lora import LoRAConfig, add_lora
from ..model.moe import MoEBlock
from ..model.transformer import SkyworkForCausalLM
from . import run_state, sft
from .config import TrainConfig
from .data import SequenceLoader


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


@dataclass
class SftData:
    """A run's fine-tuning data: its tokenizer (and the directory checkpoints copy it from),
    the training loader, the held-out rows, and a line saying what encoding did."""

    tokenizer: Tokenizer
    tokenizer_dir: Path
    loader: SequenceLoader
    val_rows: sft.SftRows | None
    summary: str


def sft_data(cfg: TrainConfig, run_dir: Path, is_main: bool,
             barrier: Callable[[], None]) -> SftData:
    """The data of ``data.format = "sft"`` (chats or prompt/completion pairs, see
    ``train.sft``). The run's tokenizer directory gets the chat template the samples were
    rendered with (the base's, or the default), so every checkpoint of the run is served
    with the template it was trained on; the main process writes it, every process waits."""
    d = cfg.data
    source = cfg.tokenizer.path or cfg.model.init_from
    if not source:
        raise ConfigError("data.format = 'sft' fine-tunes a model with its tokenizer: set "
                          "model.init_from (or tokenizer.path)")
    tokenizer = load_tokenizer(source)
    if tokenizer.eos_id is None:
        raise ConfigError(f"{source}: the tokenizer has no EOS token, which ends every "
                          "fine-tuning sample")
    template = ChatTemplate.load(source)
    tok_dir = run_dir / "tokenizer"
    if is_main:
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if name != TEMPLATE_FILE and (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, tok_dir / name)
        template.save(tok_dir)
    barrier()
    samples, stats = sft.encode_samples(d.sources, tokenizer, template, d.seq_len, d.loss_on,
                                        d.too_long, d.skip_bad)
    train, val = sft.split_samples(samples, d.val_fraction, cfg.train.seed)
    rows = sft.SftRows(train, d.seq_len, tokenizer.eos_id, d.pack)
    skipped = f", {len(stats.skipped_examples)} bad lines skipped" if d.skip_bad else ""
    summary = (f"fine-tuning data: {stats.samples} samples ({len(train)} train, {len(val)} "
               f"held out) in {len(rows)} rows of {d.seq_len} tokens"
               f"{' (packed)' if d.pack else ''}; {stats.trained_tokens} trained tokens; "
               f"{stats.truncated} truncated, {stats.dropped_too_long} dropped as too long, "
               f"{stats.dropped_untrained} without an answer token{skipped}; chat template: "
               f"{template.origin}")
    return SftData(tokenizer, tok_dir,
                   SequenceLoader(rows, cfg.train.batch_size, cfg.train.seed),
                   sft.SftRows(val, d.seq_len, tokenizer.eos_id, d.pack) if val else None,
                   summary)


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


__all__ = ["SftData", "lora_model", "lora_state_names", "sft_data", "starting_checkpoint"]
