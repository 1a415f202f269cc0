"""LoRA adapters as PEFT writes them: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensor names are PEFT's for the base's transformers class (``base_model.model.`` + module path
+ ``.lora_A.weight`` / ``.lora_B.weight``):

- projections: ``...self_attn.q_proj.lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r];
- experts, as PEFT's ``target_parameters`` LoRA on the stacked expert weights (one rank-r
  adapter per expert): ``lora_A.weight`` [r*E, in] (expert-major rows) and ``lora_B.weight``
  [out, r*E] (column ``k*E + e`` is expert e's k-th); the gate/up weight (skymoe's ``w13``,
  transformers' ``gate_up_proj``) is the inner wrapper, ``...experts.base_layer.lora_*``, the
  down weight (``w2`` / ``down_proj``) the outer one, ``...experts.lora_*``. Mixtral's module
  path is transformers' ``mlp.experts``; Skywork-MoE keeps ``block_sparse_moe.experts``;
- a trained router (``train_router``) is stored whole, as PEFT's ``modules_to_save``:
  ``...gate.weight``.

The safetensors metadata records the base's model type and skymoe's LoRA targets, so an adapter
made for another base is refused by name before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..model.lora import (ATTENTION_TARGETS, EXPERTS_TARGET, LORA, MLP_TARGETS, LoRAConfig,
                          add_lora, remove_lora)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
# PEFT's names of the stacked expert weights in transformers' classes (what target_parameters
# lists); Skywork-MoE has no transformers class, so its own parameter names stand.
_EXPERT_PARAMS = {"mixtral": ("gate_up_proj", "down_proj"), "skywork_moe": ("w13", "w2")}


def _module_path(name: str, model_type: str) -> str:
    """A skymoe module name as the base's transformers class names it (Mixtral's MoE block is
    ``mlp`` in transformers 5)."""
    if model_type != "mixtral":
        return name
    return f"{name}.".replace(".block_sparse_moe.", ".mlp.")[:-1]


def to_peft(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names and layouts (see the module docstring), from
    the model's trainable tensors by name: adapter factors (``...q_proj.lora.A``,
    ``...experts.lora.w13_B``) and router weights (``...block_sparse_moe.gate.weight``)."""
    out = {}
    for name, t in tensors.items():
        peft_name, kind = _peft_name(name, model_type)
        out[peft_name] = (_peft_A(t) if kind == "A" else _peft_B(t) if kind == "B"
                          else t).float().contiguous()
    return out


def _peft_name(name: str, model_type: str) -> tuple[str, str]:
    """(PEFT's name, layout conversion: "same", "A" or "B") of a trainable tensor of the
    model; ``CheckpointError`` for a tensor that is neither an adapter nor a router."""
    owner, sep, leaf = name.partition(f".{LORA}.")
    if sep:
        path = _PREFIX + _module_path(owner, model_type)
        if leaf in ("A", "B"):
            return f"{path}.lora_{leaf}.weight", "same"
        which, _, factor = leaf.rpartition("_")  # w13_A -> (w13, A)
        site = f"{path}.base_layer" if which == "w13" else path
        return f"{site}.lora_{factor}.weight", factor
    if ".block_sparse_moe.gate." in name:
        return _PREFIX + _module_path(name, model_type), "same"
    raise CheckpointError(f"{name}: trainable, but neither a LoRA adapter nor a router; an "
                          "adapter file holds only those")


def _peft_A(a_ERI: torch.Tensor) -> torch.Tensor:
    return a_ERI.reshape(-1, a_ERI.shape[-1])  # [E*r, in], expert-major


def _peft_B(b_EOR: torch.Tensor) -> torch.Tensor:
    e, out, r = b_EOR.shape
    return b_EOR.permute(1, 2, 0).reshape(out, r * e)  # column k*E + e


def _from_peft(kind: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if kind == "A":
        return t.reshape(shape)
    if kind == "B":
        e, out, r = shape
        return t.reshape(out, r, e).permute(2, 0, 1)
    return t


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable tensors by name (what an adapter file holds)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(tensors: dict[str, torch.Tensor], directory: str | Path, cfg: LoRAConfig,
                 model_type: str, base: str = "") -> Path:
    """Write an adapter (``tensors``: the model's trainable tensors by name, as
    ``trainable_tensors`` gives them) into ``directory`` in PEFT's format; ``model_type`` is
    the base's (``skywork_moe``, ``mixtral``, ``llama``), ``base`` its path or hub name for
    ``base_model_name_or_path``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "skymoe_model_type": model_type,
            "skymoe_targets": ",".join(cfg.targets)}
    save_file(to_peft(tensors, model_type), d / ADAPTER_WEIGHTS, metadata=meta)
    linear_targets = [t for t in cfg.targets if t != EXPERTS_TARGET]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": linear_targets,
        "target_parameters": ([f"experts.{p}" for p in _EXPERT_PARAMS.get(model_type, ())]
                              if EXPERTS_TARGET in cfg.targets else None),
        "modules_to_save": ["gate"] if cfg.train_router else None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return d


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """The ``LoRAConfig`` of a PEFT LoRA adapter directory; what skymoe cannot apply (DoRA,
    rsLoRA, per-module ranks, biases, patterns instead of names) is refused."""
    d = Path(directory)
    try:
        raw = json.loads((d / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d}: no {ADAPTER_CONFIG}; not a LoRA adapter directory "
                              "(skymoe train with finetune.lora, or PEFT's save_pretrained, "
                              "writes one)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: unreadable ({exc})") from None
    where = d / ADAPTER_CONFIG
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {raw.get('peft_type')!r}; only LoRA "
                              "adapters are supported")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False),
                    ("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {})):
        if raw.get(key, ok) not in (ok, None):
            raise CheckpointError(f"{where}: {key} = {raw[key]!r} is not supported "
                                  f"(skymoe applies plain LoRA: {key} = {ok!r})")
    modules = raw.get("target_modules") or []
    if isinstance(modules, str):
        raise CheckpointError(f"{where}: target_modules is the pattern {modules!r}; skymoe "
                              "needs a list of module names")
    targets = [m for m in ATTENTION_TARGETS + MLP_TARGETS if m in modules]  # PEFT: a set
    unknown = [m for m in modules if m not in targets]
    if unknown:
        raise CheckpointError(f"{where}: target_modules {unknown} are not LoRA targets skymoe "
                              f"knows ({list(ATTENTION_TARGETS + MLP_TARGETS)} and the experts)")
    if raw.get("target_parameters"):
        targets.append(EXPERTS_TARGET)
    saved = raw.get("modules_to_save") or []
    if any(m != "gate" for m in saved):
        raise CheckpointError(f"{where}: modules_to_save {saved}: only the router ('gate') "
                              "is supported")
    try:
        return LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout") or 0.0),
                          targets=tuple(targets), train_router=bool(saved))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a usable LoRA config ({exc})") from None


def load_adapter(model: nn.Module, directory: str | Path, model_type: str) -> LoRAConfig:
    """Add the adapter in ``directory`` to ``model`` (whose base is of ``model_type``) and fill
    it; returns its config. A tensor the model lacks, a missing one or a shape that does not
    fit is refused by name, and the model is left as it was."""
    cfg = read_adapter_config(directory)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    add_lora(model, cfg)
    try:
        _fill_adapter(model, directory, model_type)
    except CheckpointError:
        remove_lora(model)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
        raise
    return cfg


def _fill_adapter(model: nn.Module, directory: str | Path, model_type: str) -> None:
    """Copy the adapter file in ``directory`` into ``model``'s trainable tensors (its
    adapters, and routers that train), checking every name and shape first."""
    file = Path(directory) / ADAPTER_WEIGHTS
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
            stored = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}") from None
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    made_for = meta.get("skymoe_model_type")
    if made_for and made_for != model_type:
        raise CheckpointError(f"{file}: an adapter for a {made_for} base; this base is "
                              f"{model_type}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {}
    for name, p in params.items():
        peft_name, kind = _peft_name(name, model_type)
        expected[peft_name] = (p, kind)
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{file}: tensor {extra[0]} has no place in this {model_type} "
                              f"model ({len(extra)} such); an adapter for another base?")
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise CheckpointError(f"{file}: tensor {missing[0]} is missing ({len(missing)} "
                              "missing)")
    for name, (p, kind) in expected.items():
        need = _peft_shape(kind, tuple(p.shape))
        if tuple(stored[name].shape) != need:
            raise CheckpointError(f"{file}: tensor {name} is {list(stored[name].shape)}; this "
                                  f"model needs {list(need)} (an adapter for another base?)")
    with torch.no_grad():
        for name, (p, kind) in expected.items():
            p.copy_(_from_peft(kind, stored[name], tuple(p.shape)))


def _peft_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "A":
        e, r, i = shape
        return (e * r, i)
    if kind == "B":
        e, o, r = shape
        return (o, r * e)
    return shape
