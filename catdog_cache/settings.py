"""extract's settings when adding to a cache: a cache records how its features were made, so options left out take
the recorded values (no repeated flags); options given are kept as given, and extract refuses those that
contradict the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass(frozen=True)
class Settings:
    backbone: str = "vgg16"
    layer: str = ""  # "": the backbone's default
    weights: str = "imagenet"
    seed: int = 0
    views: str = "center"
    dtype: str = "float32"
    precision: str = "fp32"
    decoder: str = "pil"


def recorded_settings(cache: Path, weights_given: bool = False) -> Settings | None:
    """The settings an existing cache was made with (or its first part, after a first run that was killed); None
    when there is no cache yet. weights_given: --weights was given, so the recorded weights file is not used."""
    from .backbone import MAX_RECORDED_WEIGHTS_BYTES, spec_from_identity
    from .cache import list_parts, read_index
    from .files import plausible_file
    from .sources.decode import decoder_of

    found = [cache] if cache.exists() else list_parts(cache, clean=False)[:1]
    if not found:
        return None
    index = read_index(found[0])
    prov = index.provenance
    spec = spec_from_identity(prov.weights)
    weights = spec.kind
    if spec.kind == "file":  # the file itself is needed to extract: where it was (its sha256 is checked later)
        if not (index.weights_path and os.path.isfile(index.weights_path)):
            raise InputError(f"{found[0]} was extracted with a weights file (sha256 {spec.sha256[:12]}…) that is no "
                             f"longer at {index.weights_path or 'its recorded path'}: give --weights FILE")
        if spec.size and not weights_given and not plausible_file(index.weights_path, spec.size, spec.size):
            # another size: not the file (its hash would be read in full first: 50 s for a path to 16 GiB)
            raise InputError(f"{found[0]} was extracted with a weights file of {spec.size:,} bytes (sha256 "
                             f"{spec.sha256[:12]}…); {index.weights_path} is not that file now: give --weights FILE")
        if not weights_given and not plausible_file(index.weights_path, MAX_RECORDED_WEIGHTS_BYTES):
            # a path from a file from outside, true size recorded or none: a big file is the user's to name
            raise InputError(f"{found[0]} records its weights file at {index.weights_path}, which is not a weights "
                             f"file of at most {MAX_RECORDED_WEIGHTS_BYTES >> 30} GiB: give --weights FILE")
        weights = index.weights_path
    return Settings(prov.arch, prov.layer, weights, spec.seed, prov.views, prov.dtype, prov.precision,
                    decoder_of(prov.transform))


def resolve_settings(cache: Path, **given: object) -> Settings:
    """Options given (not None) win; the others come from the cache when it exists, else the defaults. A layer is
    only taken from the cache with its backbone (a layer name means nothing to another network)."""
    chosen = {k: v for k, v in given.items() if v is not None}
    if chosen.get("precision") == "auto" and recorded_settings(cache, weights_given="weights" in chosen):
        del chosen["precision"]  # auto adds to a cache at its recorded precision (ExtractConfig resolves it if new)
    if len(chosen) == len(given):
        return Settings(**chosen)  # type: ignore[arg-type]
    base = recorded_settings(cache, weights_given="weights" in chosen) or Settings()
    if "backbone" in chosen and chosen["backbone"] != base.backbone and "layer" not in chosen:
        chosen["layer"] = ""
    if "weights" in chosen and chosen["weights"] != base.weights and "seed" not in chosen:
        chosen["seed"] = 0
    return Settings(**{**base.__dict__, **chosen})  # type: ignore[arg-type]
