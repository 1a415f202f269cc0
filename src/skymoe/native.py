"""skymoe's native CPU kernels (``csrc/``), compiled on first use.

One extension holds the decode kernels (``csrc/decode.cpp``, used by ``skymoe.infer``) and
training's fused elementwise kernels (``csrc/train.cpp``, used by ``skymoe.model.fused``).
The build uses the machine's own instruction set (``-march=native``), so it happens where the
kernels run, once per CPU type, PyTorch version and source revision; the result is cached under
``$SKYMOE_CACHE`` (default ``~/.cache/skymoe``). Without a C++ compiler (or with
``SKYMOE_NATIVE=0``) ``native_kernels()`` returns None and callers use PyTorch ops.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "module.cpp", CSRC / "decode.cpp", CSRC / "train.cpp"]
HEADERS = [CSRC / "common.h", CSRC / "kernels.h"]


def cache_root() -> Path:
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


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled kernels, or None where they cannot be built (a warning says why)."""
    if os.environ.get("SKYMOE_NATIVE", "1") == "0":
        return None
    key = _build_key()
    build_dir = cache_root() / "native" / key
    name = f"skymoe_native_{key}"
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{name}*.so")):
            print("skymoe: compiling the native CPU kernels (once per machine, about "
                  "30 s)...", file=sys.stderr, flush=True)
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
