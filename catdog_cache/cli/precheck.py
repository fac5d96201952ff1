"""The cheap checks the CLI runs before it imports torch (3+ seconds on a laptop, more on a busy machine): an unknown
backbone, a missing folder, cache or head is reported at once. Each is the core function's own check (or, for the
head file, the same words: tests/cli/test_precheck.py compares them); the core functions still check everything,
for API users. Imports here: the standard library, backbone descriptions and (for caches) h5py, never torch."""

from __future__ import annotations

from pathlib import Path

from ..backbone import check_device, get_backbone
from ..errors import RAY_MISSING, CacheError, InputError
from ..files import check_outputs
from ..sources.folder import folder
from ..sources.spec import is_tar_input, is_url, refuse_missing, remote_fs, resolve_inputs


def extract_inputs(data_dir: str | Path, backbone: str | None, layer: str | None, device: str) -> None:
    """`data_dir` a folder, or tar shards (a .tar, a brace pattern, a listing, a URL: named and their fsspec
    backend found here; each shard is read, or reported unreadable, by extract)."""
    check_device(device)
    if backbone:  # None: appending takes the cache's own (settings.resolve_settings), checked there
        get_backbone(backbone, layer or None)  # a description: imports no model library (timm:NAME aside)
    if is_tar_input(data_dir):
        urls = [s for s in resolve_inputs(data_dir) if is_url(s)]
        if urls:
            remote_fs(urls[0])
        return
    folder(data_dir)


def engine(name: str, ray_only: dict[str, object]) -> None:
    """--engine local | ray; Ray importable (looked up, not imported); Ray's options only with --engine ray."""
    import importlib.util
    import os

    if name not in ("local", "ray"):
        raise InputError(f"--engine: expected local or ray, got {name!r}")
    if name == "local":
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            raise InputError(f"{given[0]} is an option of --engine ray (this run uses the local engine)")
        return
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise InputError("--engine ray under torchrun: start one `extract --engine ray`, Ray places the work")
    if importlib.util.find_spec("ray") is None:
        raise InputError(RAY_MISSING)


def caches_readable(caches: list[Path]) -> None:
    """Each cache exists and opens as HDF5 (the core's open_h5, so the same messages)."""
    from ..cache.opening import open_h5

    for cache in caches:
        with open_h5(cache):
            pass


def head_file(path: Path) -> None:
    """load_head's first checks (head.py imports torch)."""
    if path.is_dir():
        raise CacheError(f"--head {path} is a folder, not a head file")
    if path.exists() and not path.is_file():  # a stat, never an open: a FIFO is named, not waited on
        from ..cache.opening import file_kind

        raise CacheError(f"--head {path} is {file_kind(path.stat().st_mode)}, not a head file: refusing to read it")
    if not path.is_file():
        raise CacheError(f"no head at {path}: run `catdog-cache fit` first (or pass --head PATH)")


def score_input(data_dir: str | Path) -> None:
    """A folder, or tar shards that exist (local ones) with a backend for their URLs: the core's own checks."""
    if is_tar_input(data_dir):
        shards = resolve_inputs(data_dir)
        refuse_missing(shards)
        urls = [s for s in shards if is_url(s)]
        if urls:
            remote_fs(urls[0])
        return
    folder(data_dir)


def predict_inputs(data_dir: str | Path, head: Path, out: Path, submission: Path | None, model: Path | None,
                   caches: list[Path]) -> None:
    """predict's order: outputs, input, then the head (an exported --model is checked when it is loaded)."""
    check_outputs({"--out": out, "--submission": submission},
                  {"--head": head, "--model": model, **{f"--cache {c}": c for c in caches}})
    score_input(data_dir)
    if model is None:
        head_file(head)
