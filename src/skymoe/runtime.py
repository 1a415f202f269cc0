"""Process-level settings that make CPU training fast.

glibc serves allocations above 32 MiB with fresh ``mmap`` pages and returns freed memory to the
OS, so every large tensor of a training step (activations, bf16 weight copies, gradients) is
page-faulted in again on each step: on the bench config that costs about a third of a CPU
training step. Keeping freed memory in the process removes those faults; the price is that the
process's RSS stays at its high-water mark, which a training process reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of unmapping it (heap only, never trimmed).

    Affects the whole process from now on. Returns False, changing nothing, where the C library
    is not glibc (macOS, musl, Windows).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
