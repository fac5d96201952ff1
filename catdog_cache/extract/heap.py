"""Keep the memory a forward frees for the next one. glibc's malloc serves large blocks by mmap and hands freed
memory above a threshold back to the kernel, so a CPU forward whose activations are a few MB each faults its
pages in again on every call: EfficientNet-Lite0 on 4 images took 13,000-15,000 page faults a call (about 57 MB
zeroed) and 26 ms an image on one thread; with the thresholds raised, no faults and 19 ms (docs/performance.md)."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_BYTES = 32 << 20  # the largest mmap threshold glibc takes on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_BYTES = 128 << 20  # freed memory kept at the heap's top before it goes back to the kernel


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the loader workers it forks later). False
    where there is no glibc mallopt or where the user set the thresholds (MALLOC_*_ or GLIBC_TUNABLES): theirs
    stand."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
