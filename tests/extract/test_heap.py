"""extract keeps the memory a CPU forward frees (heap.keep_freed_memory): glibc's default thresholds hand freed
activation-sized blocks back to the kernel, and every forward call faulted them in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from catdog_cache.extract.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def calls():  # a forward's pattern: a few activation-sized blocks, then all freed
    blocks = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(4)]
    del blocks
for _ in range(6):  # the heap grows to the pattern in a few rounds
    calls()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    calls()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    kept, n = out.stdout.split()
    return kept, int(n)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    kept, ours = faults("keep")
    _, default = faults("default")
    assert kept == "True"
    assert default > 10_000  # 10 x 32 MB faulted in again: about 8,000 4 KiB pages a round
    assert ours < default / 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_users_own_malloc_settings_stand():
    kept, n = faults("keep", {"MALLOC_TRIM_THRESHOLD_": "1"})
    assert kept == "False" and n > 10_000
