"""Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), and what `--precision auto` resolves to: the
resolved value is what a cache records, so a cache never says "auto"."""

from __future__ import annotations

import functools
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@functools.cache
def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> str:
    """"amx_bf16" or "avx512_bf16" when the CPU has bf16 instructions (from its flags; no torch import), "" when
    bf16 would be emulated (slower than fp32) or the flags cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), "")


def resolve_precision(precision: str, device: str) -> str:
    """--precision auto: bf16 on a CPU with bf16 instructions (docs/performance.md gives the measured speed and
    deviation behind this), fp32 elsewhere (a GPU keeps fp32 unless asked: its speed is rarely the limit of
    a folder's extraction); any other value as given."""
    if precision != "auto":
        return precision
    if device in ("cpu", "auto"):
        if device == "auto":
            import torch

            if torch.cuda.is_available():
                return "fp32"
        return "bf16" if cpu_bf16() else "fp32"
    return "fp32"
