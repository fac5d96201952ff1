"""extract keeps the memory a CPU forward frees (heap.keep_freed_memory): glibc's default thresholds hand freed
activation-sized blocks back to the kernel, and forward calls faulted them in again (13,000-15,000 page faults a
call for Lite0 on 4 images)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                reason="glibc's mallopt and mallinfo2 (glibc 2.33+, Linux)")

CHILD = """
import ctypes, resource, sys, torch
from catdog_cache.extract.heap import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)  # an activation-sized block: mmapped (its pages returned on free) or from the heap
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)

def calls():  # a forward's pattern: a few activation-sized blocks, then all freed
    blocks = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(4)]
    del blocks

for _ in range(6):  # the heap grows to the pattern in a few rounds
    calls()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    calls()
print(kept, mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def child(mode: str, env: dict[str, str] | None = None) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    kept, mapped, faults = out.stdout.split()
    return kept, int(mapped), int(faults)


def test_freed_blocks_stay_with_the_process():
    kept, mapped, faults = child("keep")
    assert kept == "True" and mapped == 0  # served from the heap, kept there when freed
    assert faults < 500  # 10 rounds of 32 MB: 81,920 pages if they went back to the kernel each time
    _, mapped, _ = child("default")
    assert mapped >= 16 << 20  # glibc's default: mmapped, unmapped on free


def test_a_users_own_malloc_settings_stand():
    kept, mapped, _ = child("keep", {"MALLOC_TRIM_THRESHOLD_": str(1 << 20)})
    assert kept == "False" and mapped >= 16 << 20
