"""The package's layer order (docs/architecture.md): a module may import its own layer and the
layers below it, never one above. Every import counts, function-local ones included, since a
local import is still a dependency (it only moves when the cost is paid)."""

from __future__ import annotations

import ast
from pathlib import Path

import skymoe

PACKAGE = Path(skymoe.__file__).parent

# Lowest first. Each entry: the top-level modules and subpackages of that layer.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "units", "runtime", "config", "arithmetic"}),
    ("kernels", {"kernels"}),
    ("model", {"model"}),
    ("checkpoint", {"checkpoint"}),
    ("parallel", {"parallel"}),
    ("infer", {"infer"}),
    ("train", {"train", "upcycle", "quantize", "export", "merge"}),
    ("planning", {"planning"}),
    ("serve", {"serve"}),
    ("cli", {"cli", "__main__"}),
]
LAYER_OF = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def _top_level(module: Path) -> str:
    """The first component under the package: a subpackage or a top-level module's name."""
    return module.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported(module: Path, root: Path = PACKAGE) -> set[str]:
    """The top-level skymoe components ``module`` (a file under ``root``) imports, absolute
    or relative, wherever the import statement is."""
    package = module.relative_to(root).parent.parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("skymoe.")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            full = base + tuple(node.module.split(".")) if node.module else base
            found |= {full[0]} if full else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skymoe."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "skymoe":
            found |= {a.name for a in node.names}
    return found


def _modules() -> list[Path]:
    """Every module but the package's own ``__init__`` (the public facade re-exports from
    several layers)."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_component_has_a_layer():
    components = {_top_level(p) for p in _modules()}
    assert components <= set(LAYER_OF), f"give these a layer: {components - set(LAYER_OF)}"


def test_no_module_imports_a_higher_layer():
    violations = []
    for module in _modules():
        own = LAYER_OF[_top_level(module)]
        for target in _imported(module):
            if target in LAYER_OF and LAYER_OF[target] > own:
                violations.append(f"{module.relative_to(PACKAGE)} imports skymoe.{target} "
                                  f"({LAYERS[LAYER_OF[target]][0]} is above "
                                  f"{LAYERS[own][0]})")
    assert not violations, "\n".join(violations)


def test_the_check_sees_relative_absolute_and_local_imports(tmp_path):
    (tmp_path / "model").mkdir()
    module = tmp_path / "model" / "x.py"
    module.write_text("from ..serve import app\n"
                      "import skymoe.planning.search\n"
                      "def f():\n"
                      "    from ..train.trainer import Trainer\n"
                      "    from . import layers\n"
                      "    from skymoe import cli\n")
    assert _imported(module, tmp_path) == {"serve", "planning", "train", "model", "cli"}
    (tmp_path / "top.py").write_text("from . import checkpoint\nfrom .config import X\n")
    assert _imported(tmp_path / "top.py", tmp_path) == {"checkpoint", "config"}
