"""What an extract is asked and what it reports: ExtractConfig (every option, checked before any work; the
provenance it records), the versions written into every shard, and ExtractReport (counts, failures, skips)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..backbone import DECODERS, DEFAULT_BACKBONE, Backbone, WeightsSpec, check_device, get_backbone
from ..cache import (
    Provenance,
)
from ..errors import InputError
from ..sources.decode import VIEWS

PART_ROWS = 1024
PART_SECONDS = 120.0
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class ExtractConfig:
    weights: WeightsSpec
    backbone: str = DEFAULT_BACKBONE
    layer: str = ""  # "": the backbone's default (VGG16: fc7)
    device: str = "auto"
    batch_size: int = 0  # 0: auto, 16 on CPU (docs/performance.md), 128 on a GPU
    workers: int = -1  # -1: sized to the cores
    dtype: str = "float32"
    precision: str = "fp32"  # "auto": resolved at construction (precision.resolve_precision)
    views: tuple[str, ...] = ("center",)
    decoder: str = "pil"
    part_rows: int = PART_ROWS  # rows per crash-safe part; not part of provenance

    def __post_init__(self) -> None:
        if self.precision == "auto":  # the cache records what ran, never "auto"
            from .precision import resolve_precision

            object.__setattr__(self, "precision", resolve_precision("auto", self.device))

    def resolve(self) -> Backbone:
        return get_backbone(self.backbone, self.layer or None)

    def provenance(self) -> Provenance:
        bb = self.resolve()
        return Provenance(arch=bb.name, layer=bb.layer, weights=bb.recorded_identity(self.weights),
                          transform=bb.preset.spec(self.decoder),
                          views=",".join(self.views), dtype=self.dtype, precision=self.precision)

    def check(self) -> None:
        """Every option value, checked before any work (also when there is nothing to extract)."""
        check_device(self.device)
        if self.workers < -1:
            raise InputError(f"--workers must be -1 (auto), 0 (in process) or more, got {self.workers}")
        if self.batch_size < 0:
            raise InputError(f"--batch-size must be at least 1 (or 0 for auto), got {self.batch_size}")
        if self.dtype not in ("float32", "float16"):
            raise InputError(f"--dtype: expected float32 or float16, got {self.dtype!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"--precision: expected fp32, bf16 or fp16, got {self.precision!r}")
        if self.decoder not in DECODERS:
            raise InputError(f"--decoder: expected {' or '.join(DECODERS)}, got {self.decoder!r}")
        bad = [v for v in self.views if v not in VIEWS]
        if bad or not self.views:
            raise InputError(f"--views: expected a comma-separated subset of {', '.join(VIEWS)}, got {bad}")


def versions() -> dict[str, str]:
    """Recorded in every shard. torchvision's from its installed metadata: importing it pulls in torch._dynamo
    (seconds), which a rerun writing only a refresh shard would otherwise pay for a version string."""
    from importlib.metadata import PackageNotFoundError, version

    import h5py

    try:
        vision = version("torchvision")
    except PackageNotFoundError:
        vision = "unknown"
    return {"catdog_cache": __version__, "torch": torch.__version__, "torchvision": vision, "h5py": h5py.__version__}


@dataclass
class ExtractReport:
    cache: Path
    found: int
    extracted: int = 0
    reused: int = 0
    reused_failed: int = 0  # tar shards skipped as done: the failure records their markers count
    hashed: int = 0  # known files read to decide whether they changed (the others were decided by their stat)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason) this run
    failed_before: list[tuple[str, str]] = field(default_factory=list)  # unchanged files an earlier run could not use
    skipped: list[tuple[str, str]] = field(default_factory=list)  # discovery skips
    removed: list[str] = field(default_factory=list)  # in the cache, no longer in the folder
    pruned: bool = False
    rows: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    layout: str = ""

