"""``prepare(model)``: the one step that readies a loaded model for inference.

It chooses the kernels (by default ``skymoe.kernels.load_kernels``: on a CPU the native ones,
built here once per machine), sets them on the model, and on a CPU swaps modules for the
fastest inference versions available, in one walk (``skymoe.kernels.replace``) with typed
replacements: native decode modules (``skymoe.infer.native_modules``) where the native kernels
are loaded, oneDNN-prepacked ones (``skymoe.infer.cpu_kernels``) otherwise.

What cannot work is refused with a ``ConfigError`` before anything changes (and before a
build): preparing a model twice, CPU inference modules for a parallelized CPU model (they would
drop its tensor-parallel hooks and bypass its expert dispatcher; ``cpu_modules=False`` sets the
kernels only), and ``cpu_modules=True`` where none apply. The prepared model is for inference
only (eval mode, no gradients; save before preparing).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import Kernels, load_kernels
from ..kernels.replace import Rule, replace_modules
from ..model.fp8 import Fp8Experts
from ..model.moe import SwiGLUExperts
from ..model.transformer import SkyworkForCausalLM
from .cpu_kernels import PackedExperts, PackedLinear, can_pack, packed_version
from .native_modules import (NativeAttention, NativeExperts, NativeFp8Experts, NativeFp8Linear,
                             NativeLinear, NativeMoEDecoderLayer, NativeRMSNorm, WideningBuffer,
                             native_version)

# The modules only ``prepare`` puts into a model: finding one means it was prepared before.
PREPARED_MODULES = (NativeLinear, NativeRMSNorm, NativeAttention, NativeExperts,
                    NativeFp8Linear, NativeFp8Experts, NativeMoEDecoderLayer, PackedLinear,
                    PackedExperts)
_CPU_DTYPES = (torch.float32, torch.bfloat16)


def prepare(model: SkyworkForCausalLM, *, kernels: Kernels | None = None,
            cpu_modules: bool | Literal["auto"] = "auto") -> SkyworkForCausalLM:
    """Ready ``model`` for inference in place and return it.

    ``kernels``: the backend (default: ``load_kernels(model.device)``, which on a CPU builds
    the native kernels if this machine has no build yet, saying so on stderr).
    ``cpu_modules``: ``"auto"`` swaps in CPU inference modules where they apply (a CPU model
    in float32 or bfloat16: native decode modules with native kernels, otherwise oneDNN-packed
    ones where this CPU supports them) and leaves other models' modules alone; ``True``
    requires them; ``False`` keeps the modules and only sets the kernels.
    """
    if cpu_modules not in (True, False, "auto"):
        raise ConfigError(f"cpu_modules must be True, False or 'auto', not {cpu_modules!r}")
    _refuse_prepared(model)
    unfit = _unfit_for_cpu_modules(model)
    if cpu_modules is True and unfit is not None:
        raise ConfigError(f"prepare(cpu_modules=True): {unfit}")
    swap = cpu_modules is not False and unfit is None
    if swap:  # refused before the kernels load: a first build takes ~30 s
        _refuse_parallelized(model)
    kernels = load_kernels(model.device) if kernels is None else kernels
    rule = _cpu_rule(model, kernels, required=cpu_modules is True) if swap else None
    model.use_kernels(kernels)
    if rule is not None:
        model.eval().requires_grad_(False)
        replace_modules(model, rule)
    return model


def _unfit_for_cpu_modules(model: SkyworkForCausalLM) -> str | None:
    """Why CPU inference modules cannot serve ``model``, or None if they can."""
    if model.device.type != "cpu":
        return (f"the model is on {model.device}; CPU inference modules serve CPU models "
                "(prepare with cpu_modules='auto' or False)")
    if model.dtype not in _CPU_DTYPES:
        return (f"the model is in {model.dtype}; CPU inference modules serve float32 and "
                "bfloat16 models (load it with dtype bfloat16)")
    return None


def _cpu_rule(model: SkyworkForCausalLM, kernels: Kernels, required: bool) -> Rule | None:
    """The replacement rule of the fastest CPU inference modules ``kernels`` allow, or None
    (a ``ConfigError`` when they are ``required``)."""
    if kernels.native is not None:
        return functools.partial(native_version, WideningBuffer(kernels.native))
    if can_pack(model):
        return packed_version
    if required:
        raise ConfigError(f"prepare(cpu_modules=True): the native kernels are not loaded "
                          f"(kernels={kernels.name}) and oneDNN packing is unavailable for "
                          f"{model.dtype} on this CPU; pass kernels=skymoe.kernels."
                          "load_kernels() or cpu_modules='auto'")
    return None


def _refuse_prepared(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, PREPARED_MODULES):
            raise ConfigError(f"{name}: already a {type(module).__name__}, so this model was "
                              "prepared for inference before; prepare a model once, right "
                              "after loading it")


def _refuse_parallelized(model: nn.Module) -> None:
    """CPU inference modules compute a layer whole, on this process: refuse models whose
    layers were parallelized (they would run without their collectives)."""
    advice = ("CPU inference modules would bypass it; prepare this model with "
              "cpu_modules=False, or run it without tensor/expert parallelism")
    for name, module in model.named_modules():
        where = name or "the model"
        if isinstance(module, (SwiGLUExperts, Fp8Experts)) and module.parallel is not None:
            raise ConfigError(f"{where}: has an expert-parallel dispatcher (.parallel); "
                              f"{advice}")
        # Tensor parallelism's collectives are forward hooks; a replaced module loses them.
        if module._forward_hooks or module._forward_pre_hooks:
            raise ConfigError(f"{where}: has forward hooks (tensor parallelism registers its "
                              f"collectives as hooks); {advice}")
