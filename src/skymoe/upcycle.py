"""Upcycling: a dense Llama-format checkpoint becomes a Skywork-MoE checkpoint, streamed.

Attention, embeddings and norms are copied; in every MoE layer each expert is a copy of that
layer's dense FFN (gate_proj -> w1, up_proj -> w3, down_proj -> w2) and the router starts from a
small random init or zeros. Identical experts with renormalized top-k weights (and no x top-k
input scaling) compute exactly the dense FFN, so the upcycled model starts as the dense model.
Optional Gaussian noise on the copies and Drop-Upcycling's partial re-initialization make the
experts differ from the start.

The dense checkpoint is read tensor by tensor and the output written shard by shard, so memory
stays near one input tensor plus one output shard, whatever the size of the result.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from .checkpoint import io, names
from .checkpoint.convert import write_converted
from .config import SkyworkMoeConfig, parameter_counts
from .errors import CheckpointError, ConfigError
from .model.transformer import SkyworkForCausalLM

_DENSE_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_OF = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass
class UpcycleOptions:
    """How to build the MoE (see ``skymoe upcycle --help``)."""

    num_experts: int = 16
    top_k: int = 2
    interval: int = 1               # every n-th layer becomes MoE (Megatron's convention)
    router_init: str = "random"     # or "zeros"
    router_std: float = 0.02
    seed: int = 0
    noise_std: float = 0.0          # Gaussian noise on expert copies, relative to each weight's std
    reinit_fraction: float = 0.0    # Drop-Upcycling: share of each expert's FFN units re-drawn
    use_logits_norm: bool = True
    gate_norm_std: float = 1.0
    max_shard_bytes: int = io.DEFAULT_SHARD_BYTES

    def validate(self) -> None:
        checks = [
            (self.num_experts >= 2, "--experts must be >= 2"),
            (1 <= self.top_k <= self.num_experts, "--top-k must be between 1 and --experts"),
            (self.interval >= 1, "--interval must be >= 1"),
            (self.router_init in ("random", "zeros"), "--router-init must be random or zeros"),
            (self.router_std >= 0 and self.noise_std >= 0, "std values must be >= 0"),
            (0 <= self.reinit_fraction <= 1, "--reinit-fraction must be in [0, 1]"),
            (self.gate_norm_std > 0, "--gate-norm-std must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def moe_config(dense: SkyworkMoeConfig, opts: UpcycleOptions) -> SkyworkMoeConfig:
    """The Skywork-MoE config of the upcycled model: the dense one plus experts and router."""
    hf = dense.to_hf_dict("llama")
    hf.update(model_type="skywork_moe", num_experts=[opts.num_experts],
              num_experts_per_tok=opts.top_k, moe_expert_interval=opts.interval,
              moe_use_logits_norm=opts.use_logits_norm, moe_gate_norm_std=opts.gate_norm_std,
              moe_2layer_gate=False, moe_feature_no_mul_topk=True,  # keeps the dense function
              moe_use_skywork_gating=False)
    hf.pop("architectures", None)
    if dense.model_type == "llama":
        hf.pop("sliding_window", None)  # Llama ignores the key; in skywork_moe it would apply
    return SkyworkMoeConfig.from_hf_dict(hf)


def _generator(opts: UpcycleOptions, *key: int) -> torch.Generator:
    # One stream per (layer, expert, purpose): results do not depend on the order tensors come in.
    seed = opts.seed
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _reinit_units(opts: UpcycleOptions, layer: int, expert: int, ffn: int) -> torch.Tensor:
    """FFN units (rows of w1/w3, columns of w2) that Drop-Upcycling re-draws for one expert."""
    count = round(opts.reinit_fraction * ffn)
    return torch.randperm(ffn, generator=_generator(opts, layer, expert, 1))[:count]


def expert_copy(weight: torch.Tensor, which: str, layer: int, expert: int,
                opts: UpcycleOptions) -> torch.Tensor:
    """One expert's copy of a dense FFN weight, with the optional noise and re-initialization."""
    out = weight.float().clone()
    std = out.std().item() if out.numel() > 1 else 0.0
    if opts.noise_std > 0:
        gen = _generator(opts, layer, expert, 2, {"w1": 1, "w3": 3, "w2": 2}[which])
        out += torch.randn(out.shape, generator=gen) * (opts.noise_std * std)
    if opts.reinit_fraction > 0:
        ffn = out.shape[1] if which == "w2" else out.shape[0]
        units = _reinit_units(opts, layer, expert, ffn)
        gen = _generator(opts, layer, expert, 3, {"w1": 1, "w3": 3, "w2": 2}[which])
        mean = out.mean().item()
        if which == "w2":
            out[:, units] = torch.randn(out.shape[0], len(units), generator=gen) * std + mean
        else:
            out[units] = torch.randn(len(units), out.shape[1], generator=gen) * std + mean
    return out.to(weight.dtype)


def _router(config: SkyworkMoeConfig, layer: int, dtype: torch.dtype,
            opts: UpcycleOptions) -> torch.Tensor:
    shape = (opts.num_experts, config.hidden_size)
    if opts.router_init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=_generator(opts, layer, 0, 4)) * opts.router_std).to(dtype)


def _dense_expectations(dense: SkyworkMoeConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = SkyworkForCausalLM(dense)
    return {name: tuple(t.shape) for name, t in names.hf_tensors(model)}


def upcycled_tensors(dense_dir: Path, dense: SkyworkMoeConfig, moe: SkyworkMoeConfig,
                     opts: UpcycleOptions, progress: tqdm | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The MoE checkpoint's tensors, produced while reading the dense one tensor by tensor.
    Checks every dense tensor's name and shape; raises CheckpointError naming file and tensor."""
    expected = _dense_expectations(dense)
    seen: set[str] = set()
    routers_done: set[int] = set()
    for file in io.weight_files(dense_dir):
        for name, tensor in io.iter_tensors(file):
            if names.is_ignored(name):
                continue
            if name not in expected:
                raise CheckpointError(f"{file}: tensor '{name}' is not part of a dense "
                                      f"Llama-format model with {dense.num_hidden_layers} layers; "
                                      "is this a dense checkpoint?")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(f"{file}: tensor '{name}' has shape {list(tensor.shape)}, "
                                      f"config.json implies {list(expected[name])}")
            seen.add(name)
            if progress is not None:
                progress.update(tensor.numel() * tensor.element_size())
            m = _DENSE_FFN.match(name)
            if m is None or not moe.is_moe_layer(int(m[1])):
                yield name, tensor
                continue
            layer, which = int(m[1]), _EXPERT_OF[m[2]]
            prefix = f"model.layers.{layer}.block_sparse_moe"
            if layer not in routers_done:
                routers_done.add(layer)
                yield f"{prefix}.gate.weight", _router(moe, layer, tensor.dtype, opts)
            for e in range(opts.num_experts):
                yield f"{prefix}.experts.{e}.{which}.weight", expert_copy(tensor, which, layer,
                                                                           e, opts)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{dense_dir}: {len(missing)} tensor(s) missing from the dense "
                              f"checkpoint, e.g. '{missing[0]}'")


def upcycle(dense_dir: str | Path, out_dir: str | Path, opts: UpcycleOptions,
            overwrite: bool = False, show_progress: bool | None = None) -> Path:
    """Write the upcycled Skywork-MoE checkpoint (config, weights, tokenizer) to ``out_dir``.

    The result is assembled in a temporary sibling directory and renamed into place at the end,
    so a failure or an interruption never leaves an output that looks complete. An existing
    ``out_dir`` is refused unless ``overwrite``.
    """
    opts.validate()
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    dense = read_dense_config(dense_dir)
    moe = moe_config(dense, opts)
    return write_converted(
        dense_dir, out_dir, moe,
        lambda bar: upcycled_tensors(dense_dir, dense, moe, opts, bar), opts.max_shard_bytes,
        overwrite, show_progress, desc="upcycle")


def read_dense_config(dense_dir: Path) -> SkyworkMoeConfig:
    """The config of a dense Llama-format checkpoint directory, or a clear error."""
    if not (dense_dir / "config.json").is_file():
        raise CheckpointError(f"{dense_dir}: no config.json; expected a dense Llama-format HF "
                              "checkpoint directory")
    config = SkyworkMoeConfig.from_json_file(dense_dir)
    if config.is_moe:
        raise CheckpointError(f"{dense_dir}: is already an MoE model ({config.model_type}, "
                              f"{config.num_experts} experts); upcycling needs a dense model")
    return config


# ----------------------------------------------------------------------------------- advice
@dataclass
class Advice:
    dense_flops: float
    moe_flops: float
    ratio: float
    verdict: str
    lines: list[str]


def advise(dense_params: float, dense_tokens: float, moe_active_params: float,
           moe_tokens: float) -> Advice:
    """The report's rule of thumb: with C = 6 * active parameters * tokens, upcycle when the
    MoE budget is well below the compute sunk into the dense model; train from scratch when it
    is at least twice that."""
    for name, value in (("dense parameters", dense_params), ("dense tokens", dense_tokens),
                        ("MoE active parameters", moe_active_params), ("MoE tokens", moe_tokens)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a positive number, got {value}")
    c_dense = 6 * dense_params * dense_tokens
    c_moe = 6 * moe_active_params * moe_tokens
    ratio = c_moe / c_dense
    if ratio >= 2:
        verdict = ("train from scratch: the MoE budget is at least twice the dense model's "
                   "compute, where the report's from-scratch MoE overtook the upcycled one")
    elif ratio < 1:
        verdict = ("upcycle: the MoE budget is well below the compute already in the dense "
                   "model, which upcycling reuses; use a fresh warmup + decay schedule")
    else:
        verdict = ("borderline (between 1x and 2x): upcycling is ahead early, training from "
                   "scratch catches up by about 2x; upcycle if the budget may shrink")
    lines = [
        f"C_dense = 6 x {dense_params:.4g} params x {dense_tokens:.4g} tokens = {c_dense:.4g} FLOPs",
        f"C_moe   = 6 x {moe_active_params:.4g} active params x {moe_tokens:.4g} tokens "
        f"= {c_moe:.4g} FLOPs",
        f"C_moe / C_dense = {ratio:.3g}",
    ]
    return Advice(c_dense, c_moe, ratio, verdict, lines)


def active_params(config: SkyworkMoeConfig) -> int:
    """Non-embedding parameters one token passes through (the N of C = 6 N D)."""
    return parameter_counts(config)["active_non_embedding"]

