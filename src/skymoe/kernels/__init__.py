"""Which implementation computes the model's CPU hot spots: an explicit choice, made once.

``Kernels`` names the backend: the PyTorch ops (``PYTORCH_KERNELS``, what every new model
uses) or skymoe's native CPU kernels (``Kernels(native=<extension>)``: the fused SwiGLU, the
MoE's row gather and weighted combine, the cross-entropy rows, and the decode kernels of
``skymoe.infer``). The extension is built by a named preparation step, ``load_kernels`` or
``load_native``, never inside a forward; a model computes with it after
``model.use_kernels(kernels)`` (training) or ``skymoe.infer.prepare.prepare`` (inference).

This package sits below ``skymoe.model``: it imports no other part of skymoe.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from . import fused
from .native import Progress, load_native, to_stderr

__all__ = ["PYTORCH_KERNELS", "Kernels", "UsesKernels", "load_kernels", "load_native"]


@dataclass(frozen=True)
class Kernels:
    """The kernel backend: ``native`` is the loaded extension, or None for the PyTorch ops.

    The native kernels serve CPU fp32/bf16 tensors outside ``torch.compile`` (which fuses this
    work itself); other tensors take the PyTorch ops whatever the choice.
    """

    native: ModuleType | None = None

    @property
    def name(self) -> str:
        """``"native"`` or ``"pytorch"`` (for logs and messages)."""
        return "pytorch" if self.native is None else "native"

    def native_for(self, t: torch.Tensor) -> ModuleType | None:
        """The native extension if it serves ``t`` (see the class docstring), else None."""
        if (self.native is None or t.device.type != "cpu"
                or t.dtype not in (torch.float32, torch.bfloat16)
                or torch.compiler.is_compiling()):
            return None
        return self.native

    def swiglu(self, h: torch.Tensor, consume_input: bool = False) -> torch.Tensor:
        """``silu(gate) * up`` of ``h = [gate | up]`` along the last dimension.

        ``consume_input``: the caller promises that nothing else uses ``h`` (a fresh
        intermediate); the native backward may then write the gradient over it.
        """
        native = self.native_for(h)
        if native is not None:
            return fused.swiglu(native, h, consume_input)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def __deepcopy__(self, memo: dict) -> Kernels:
        # The choice is immutable and an extension module cannot be copied: copies of a model
        # share it.
        return self


PYTORCH_KERNELS = Kernels()


class UsesKernels:
    """Mixin of the modules that compute with a ``Kernels`` choice, held as ``kernels``
    (``PYTORCH_KERNELS`` until ``SkyworkForCausalLM.use_kernels`` sets another)."""

    kernels: Kernels = PYTORCH_KERNELS


def load_kernels(device: torch.device | str = "cpu",
                 progress: Progress | None = to_stderr) -> Kernels:
    """The fastest kernels for a model on ``device``: on a CPU the native ones (built first
    where this machine has no build yet, about 30 s, which ``progress`` hears about) unless
    ``SKYMOE_NATIVE=0`` or they cannot be built (a warning says why); the PyTorch ops
    elsewhere."""
    if torch.device(device).type != "cpu":
        return PYTORCH_KERNELS
    return Kernels(load_native(progress))
