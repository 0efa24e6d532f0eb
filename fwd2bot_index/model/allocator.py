"""Keep glibc's malloc from handing every freed activation back to the kernel.

Why: glibc serves allocations above its mmap threshold (128 KiB at start, adjusted upwards as chunks are
freed) with fresh ``mmap`` calls and trims the heap top after frees, so a CPU forward pass that allocates
and frees activation tensors of a few hundred KiB to a few MiB pays page faults on every layer, every
batch, in every new process. Measured on the demo model (2 cores, batch 16): 70 ms per batch in a fresh
process, 44 ms with the thresholds below, the same speed a long-lived process reaches by chance. PyTorch's
CPU performance guide recommends jemalloc or tcmalloc for the same reason; this keeps the default
allocator and only moves its thresholds, so nothing extra needs installing.

Only applied on Linux with glibc, once per process, when the model runs on the CPU; left alone when the
user tunes malloc already (``MALLOC_*_`` variables, a preloaded allocator) or sets ``F2B_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (its dynamic maximum)
TRIM_THRESHOLD = 256 << 20

_tuned: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds (once); True when they are set in this process."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or os.environ.get("F2B_MALLOC_TUNING", "1").strip() == "0":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # the user chose an allocator or its settings
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        if not libc.gnu_get_libc_version:  # glibc only (musl has a mallopt that does nothing)
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _tuned
