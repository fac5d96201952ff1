"""Train the head on cached features. `train` is the one training loop: fit runs it on cached rows, verify runs it
on features computed end-to-end, and the two agree because everything random comes from explicit generators.

Stages, one module each: config (FitConfig, EpochStats), splits (seeds, validation split, folds), batches (the batch
order), optim (Adam), loop (train, evaluate), calibration (log loss, temperature), data (in memory, streamed,
ensembles), crossfit (--folds), valfolder (--val DIR), run (fit itself, the head's default path).

The names below are imported on first use (PEP 562): `from catdog_cache.fit import FitConfig` imports neither torch
nor h5py, so the CLI checks fit's options and files before paying for them."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "WINDOW_CHUNKS": "batches", "windowed_batches": "batches",
    "CLIP_CANDIDATES": "calibration", "calibrate": "calibration", "log_loss": "calibration",
    "Diverged": "config", "EpochStats": "config", "Features": "config", "FitConfig": "config",
    "cross_fit": "crossfit",
    "Data": "data", "Gather": "data", "Streamed": "data", "available_memory": "data", "check_finite": "data",
    "labeled_rows": "data", "load": "data", "parse_size": "data", "on_device": "data",
    "evaluate": "loop", "train": "loop", "train_threads": "loop", "batch_source": "loop", "epoch_batches": "loop",
    "training_device": "loop",
    "Adam": "optim",
    "DEFAULT_HEAD": "config", "default_head_path": "config", "FitReport": "run", "fit": "run",
    "fold_of": "splits", "path_hash": "splits", "split": "splits", "streams": "splits",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
