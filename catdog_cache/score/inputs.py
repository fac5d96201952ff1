"""What predict and preview score: an INPUT as extract takes it (a folder; or tar shards: a .tar, a brace pattern, a
listing, a URL), resolved once per command. A folder is walked once and its Discovery passed along (to the read-only
plan, to the training-cache check, to scoring); tar shards are listed once. A tar row is named in outputs as
`<shard file name>#<key>` (the shard's full source where two shards of the input share a file name): keys repeat
across shards (img2dataset numbers each shard's samples from 0), so the key alone would not name one image."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..files import plural
from ..sources.folder import Discovery, discover
from ..sources.spec import TAR_SUFFIXES, is_tar_input, is_url, refuse_missing, resolve_inputs


@dataclass
class ScoreInput:
    spec: str  # as given (a URL stays a string: Path would fold its `//`)
    shards: list[str] | None = None  # tar input: each shard's source as the cache records it; None: a folder
    disc: Discovery | None = None  # a folder's walk, taken once (discovery())
    _names: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def tars(self) -> bool:
        return self.shards is not None

    @property
    def sources(self) -> list[str]:
        """The cache sources this input's rows have: the folder's absolute path, or each shard's."""
        return self.shards if self.shards is not None else [str(Path(self.spec).resolve())]

    def discovery(self) -> Discovery:
        """The folder's samples, walked on first use only."""
        if self.disc is None:
            self.disc = discover(self.spec)
        return self.disc

    def row_name(self, source: str, key: str) -> str:
        """How outputs name a row: a folder's relative path; a tar sample `<shard file name>#<key>`."""
        if self.shards is None:
            return key
        if not self._names:
            self._names = shard_names(self.shards)
        return f"{self._names.get(source, source)}#{key}" if key else self._names.get(source, source)

    def cache_name(self) -> str:
        """The input's name for a default cache file: the folder's name; for tar input the pattern's, listing's or
        tar's file name without brace groups and suffix (`x-{000000..000009}.tar` -> `x`)."""
        if self.shards is None:
            return Path(self.spec).resolve().name
        base = re.sub(r"\{[^{}]*\}", "", self.spec.rstrip("/").rsplit("/", 1)[-1])
        lower = base.lower()
        suffix = next((s for s in TAR_SUFFIXES if lower.endswith(s)), os.path.splitext(base)[1])
        name = re.sub(r"[^A-Za-z0-9._-]", "_", base[: len(base) - len(suffix)]).strip("-_.")
        return name or "shards"


def shard_names(shards: list[str]) -> dict[str, str]:
    """Each shard's file name (a URL's last path part), or its full source where two shards share a file name."""
    names = {s: (s.rstrip("/").rsplit("/", 1)[-1] if is_url(s) else os.path.basename(s)) for s in shards}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    return {s: n if counts[n] == 1 and n else s for s, n in names.items()}


def score_input(data: str | os.PathLike[str] | ScoreInput | Discovery) -> ScoreInput:
    """Resolve an input once: tar shards listed (local ones that do not exist refused before any work), a folder
    not yet walked (discovery() walks it when first needed)."""
    if isinstance(data, ScoreInput):
        return data
    if isinstance(data, Discovery):
        return ScoreInput(str(data.root), None, data)
    spec = os.fspath(data)
    if is_tar_input(spec):
        shards = resolve_inputs(spec)
        refuse_missing(shards)
        return ScoreInput(spec, shards)
    return ScoreInput(spec)


def folder_samples(inp: ScoreInput) -> Discovery:
    """A folder input's samples; none is an error."""
    disc = inp.discovery()
    if not disc.samples:
        raise InputError(f"no images found in {inp.spec}" + (f" ({plural(len(disc.skipped), 'file')} skipped)"
                                                              if disc.skipped else ""))
    return disc
