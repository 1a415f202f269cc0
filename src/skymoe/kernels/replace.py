"""One walker that swaps a model's modules for kernel-specific versions: FP8 storage when a
checkpoint loads (``skymoe.model.fp8``) and CPU inference modules (``skymoe.infer.prepare``).

Each swap is a typed module built by a rule; the walker only decides the order. Children are
visited before their parent, so a rule that replaces a parent sees the parent's final children
(a native decoder layer is built from the native attention and experts it already holds).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

# (qualified name, parent, child) -> the module that takes the child's place, or None to keep it
Rule = Callable[[str, nn.Module, nn.Module], "nn.Module | None"]


def replace_modules(root: nn.Module, rule: Rule, prefix: str = "") -> list[str]:
    """Apply ``rule`` to every submodule of ``root`` in place, children before parents;
    returns the qualified names of the modules replaced."""
    replaced = []
    for name, child in list(root.named_children()):
        path = prefix + name
        replaced += replace_modules(child, rule, path + ".")
        new = rule(path, root, child)
        if new is not None:
            setattr(root, name, new)
            replaced.append(path)
    return replaced
