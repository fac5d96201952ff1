"""What this process may run on, read without importing torch: shared by extract's core split, fit's spare core and
the Ray engine's local resources."""

from __future__ import annotations

import os


def affinity_cores() -> int:
    """The cores this process may use: its CPU affinity (a container's or taskset's share), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
