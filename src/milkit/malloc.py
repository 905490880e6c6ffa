"""Where the C allocator finds memory during training (glibc only; the arithmetic is untouched).

glibc's malloc hands freed blocks back to the OS above moving thresholds, so every training step's
activation and gradient buffers (0.1-30 MB) came back as fresh pages: ~175-480 page faults and
~1-2 ms more per ABMIL backward in milkit's process than in a plain loop (docs/benchmarks.md,
issue 15). :func:`keep_freed_memory` fixes the thresholds, once per process, from
:func:`milkit.engine.fit_stage`. ``MILKIT_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import os

#: free heap top kept for reuse instead of being trimmed back to the OS (the largest value mallopt takes:
#: a 100k-instance step frees ~2 GB that the next step needs again; issue 15)
MALLOC_TRIM_BYTES = (1 << 31) - 1
#: blocks below this come from the heap, not a fresh mmap (glibc's largest mmap threshold, 64-bit)
MALLOC_MMAP_BYTES = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc malloc.h
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True when it did. False where there is
    no glibc or ``MILKIT_KEEP_FREED_MEMORY=0`` (nothing changes then)."""
    global _kept
    if _kept is not None:
        return _kept
    _kept = False
    if os.environ.get("MILKIT_KEEP_FREED_MEMORY", "1") == "0":
        return _kept
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _kept
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return _kept
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _kept = bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES)) and bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES))
    # blocks over 32 MB (100k × 512 float32 is 205 MB) from the heap too, not a fresh mmap each time
    _kept = _kept and bool(mallopt(_M_MMAP_MAX, 0))
    return _kept
