"""skymoe's native CPU kernels (``csrc/``), compiled by an explicit preparation step.

One extension holds the decode kernels (``csrc/decode.cpp``, used by ``skymoe.infer``) and
training's fused elementwise kernels (``csrc/train.cpp``, used through ``skymoe.kernels``).
The build uses the machine's own instruction set (``-march=native``), so it happens where the
kernels run, once per CPU type, PyTorch version and source revision; the result is cached under
``$SKYMOE_CACHE`` (default ``~/.cache/skymoe``). ``load_native`` builds or loads it; nothing
else does, so a model's forward never starts a build. Without a C++ compiler (or with
``SKYMOE_NATIVE=0``) ``load_native()`` returns None and callers use PyTorch ops.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

CSRC = Path(__file__).parent.parent / "csrc"
SOURCES = [CSRC / "module.cpp", CSRC / "decode.cpp", CSRC / "train.cpp"]
HEADERS = [CSRC / "common.h", CSRC / "kernels.h"]


def cache_root() -> Path:
    """Where builds are kept: ``$SKYMOE_CACHE``, else ``$XDG_CACHE_HOME/skymoe`` or
    ``~/.cache/skymoe``."""
    if os.environ.get("SKYMOE_CACHE"):
        return Path(os.environ["SKYMOE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "skymoe"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags"))]
        return "\n".join(dict.fromkeys(wanted))  # one copy per distinct line, not per core
    except OSError:
        return platform.processor() or platform.machine()


def _build_key() -> str:
    digest = hashlib.sha256()
    for part in ([path.read_bytes() for path in SOURCES + HEADERS]
                 + [torch.__version__.encode(), _cpu_signature().encode(), sys.version.encode()]):
        digest.update(part)
    return digest.hexdigest()[:16]


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary is not on it when the
    virtual environment is used without being activated."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


Progress = Callable[[str], None]

BUILD_MESSAGE = "building skymoe's native CPU kernels (once per machine, ~30 s)..."


def to_stderr(message: str) -> None:
    """The default progress report: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


# The extension loaded by this process (a process loads a given build once), or None for
# "tried and unavailable"; absent until the first ``load_native``.
_loaded: dict[str, ModuleType | None] = {}


def load_native(progress: Progress | None = to_stderr) -> ModuleType | None:
    """The compiled kernels, building them first where this machine has no cached build
    (``progress`` hears about it: the build takes about 30 s), or None where they cannot be
    built (a warning says why) or ``SKYMOE_NATIVE=0`` disables them. Loaded once per process."""
    if os.environ.get("SKYMOE_NATIVE", "1") == "0":
        return None
    if "native" not in _loaded:
        _loaded["native"] = build_native(progress)
    return _loaded["native"]


def build_native(progress: Progress | None = None) -> ModuleType | None:
    """Build (or load from the cache directory) the extension from ``SOURCES``, uncached in
    the process; None, with a warning, where the build fails."""
    key = _build_key()
    build_dir = cache_root() / "native" / key
    name = f"skymoe_native_{key}"
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        if progress is not None and not any(build_dir.glob(f"{name}*.so")):
            progress(BUILD_MESSAGE)
        return load(name=name, sources=[str(path) for path in SOURCES],
                    build_directory=str(build_dir),
                    # OpenMP: at::parallel_for's pragmas (the process's runtime, torch's own,
                    # is reused: same soname).
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or ninja, unsupported platform, build error
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if len(reason) > 160:
            reason = reason[:160] + "..."
        warnings.warn(f"skymoe: native CPU kernels unavailable ({reason}; build directory "
                      f"{build_dir}); PyTorch ops are used instead (set SKYMOE_NATIVE=0 to skip "
                      "the attempt)", stacklevel=2)
        return None
