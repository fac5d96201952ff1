"""The one entry to extraction: `extract(input, cache, config, engine=...)` decides the source kind once (a folder, or
tar shards) and the engine by name (local or ray), then runs that engine's distributor over the source's units."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from ..errors import RAY_MISSING, InputError
from ..extract.config import ExtractConfig, ExtractReport, Progress
from ..extract.folder import extract_folder
from ..extract.tars import extract_tars
from ..sources.spec import is_tar_input
from ..store.staging import writable_cache
from ..store.url import StoreURL, check_location
from .ray_folder import extract_ray_folder
from .ray_pool import RayOptions
from .ray_tars import extract_ray_tars

ENGINES = ("local", "ray")


def extract(data_dir: str | os.PathLike[str], cache: str | os.PathLike[str], cfg: ExtractConfig,
            progress: Progress | None = None, prune: bool = False, strict: bool = False,
            only: set[str] | None = None, model: torch.nn.Module | None = None, checksum: bool = False,
            classes: Sequence[str] | None = None, engine: str = "local", ray: RayOptions | None = None
            ) -> ExtractReport:
    """Cache features for every image of an input (a folder; or tar shards: a .tar, a brace pattern, a listing, a
    URL) that the cache does not already hold as it is now, on `engine` (local or ray, with `ray`'s options).
    `classes` names what tar shards' `.cls` indexes mean (a folder's classes are its sub-folders); `only` and `model`
    are the local engine's (a subset of a folder's files; an already built backbone)."""
    cfg.check()
    loc = check_location(cache)  # one parse of a path or URL: a URL never becomes a folder named "s3:"
    if isinstance(loc, StoreURL):  # staged locally, uploaded shard by shard, the index last
        with writable_cache(loc, "extract", engine, cfg.device) as local:
            return extract(data_dir, local, cfg, progress, prune, strict, only, model, checksum, classes, engine, ray)
    cache = loc
    tars = is_tar_input(data_dir)
    if tars and (prune or only is not None):
        raise InputError(f"--prune works on folders; {data_dir} names tar shards")
    if not tars and classes is not None:
        raise InputError(f"--classes names the classes of tar shards; {data_dir} is a folder, whose classes are its "
                         "sub-folders: leave --classes out")
    if engine == "local":
        if tars:
            return extract_tars(data_dir, cache, cfg, progress=progress, strict=strict, model=model, classes=classes,
                                checksum=checksum)
        return extract_folder(data_dir, cache, cfg, progress, prune, strict, only, model, checksum)
    if engine != "ray":
        raise InputError(f"--engine: expected {' or '.join(ENGINES)}, got {engine!r}")
    opts = ray or RayOptions()
    opts.check()
    if importlib.util.find_spec("ray") is None:  # imported only when a unit needs running (about a second)
        raise InputError(RAY_MISSING)
    if tars:
        return extract_ray_tars(data_dir, cache, cfg, opts, progress, strict, classes, checksum)
    return extract_ray_folder(data_dir, cache, cfg, opts, progress, prune, strict, checksum)
