"""Train the head on cached features. `train` is the one training loop: fit runs it on cached rows, verify runs it
on features computed end-to-end, and the two agree because everything random comes from explicit generators.

Stages, one module each: config (FitConfig, EpochStats), splits (seeds, validation split, folds), batches (the batch
order), optim (Adam), loop (train, evaluate), calibration (log loss, temperature), data (in memory, streamed,
ensembles), crossfit (--folds), run (fit itself, the head's default path)."""

from .batches import WINDOW_CHUNKS, windowed_batches
from .calibration import CLIP_CANDIDATES, calibrate, log_loss
from .config import Diverged, EpochStats, Features, FitConfig
from .crossfit import cross_fit
from .data import Data, Gather, Streamed, available_memory, check_finite, labeled_rows, load, on_device, parse_size
from .loop import batch_source, epoch_batches, evaluate, train, train_threads, training_device
from .optim import Adam
from .run import DEFAULT_HEAD, FitReport, default_head_path, fit
from .splits import fold_of, path_hash, split, streams

__all__ = [
    "CLIP_CANDIDATES", "DEFAULT_HEAD", "WINDOW_CHUNKS", "Adam", "Data", "Diverged", "EpochStats", "Features",
    "FitConfig", "FitReport", "Gather", "Streamed", "available_memory", "batch_source", "calibrate", "check_finite",
    "cross_fit", "default_head_path", "epoch_batches", "evaluate", "fit", "fold_of", "labeled_rows", "load", "log_loss",
    "on_device", "parse_size", "path_hash", "split", "streams", "train", "train_threads", "training_device",
    "windowed_batches",
]
