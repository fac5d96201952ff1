"""What the audit says about each row of a cache: its name (a folder's file path, or a tar sample's `shard#key`),
where its picture is, its content hash and its label."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache import Index
from ..sources.spec import TAR_SUFFIXES, is_url


def is_tar_source(source: str) -> bool:
    """A cache records a tar shard by its path or URL (a .tar, .tgz, .tar.gz), a folder by its path."""
    return is_url(source) or source.lower().endswith(TAR_SUFFIXES)


@dataclass
class CacheRows:
    cache: Path
    names: list[str]  # how every output names the row
    sources: list[str]  # each row's folder or tar shard
    keys: list[str]  # each row's relative path (folder) or sample key (tar)
    sha256: list[str]
    labels: np.ndarray  # [N] int, -1 unlabeled
    classes: list[str]

    def label_name(self, i: int) -> str:
        return self.classes[self.labels[i]] if self.labels[i] >= 0 else ""

    def picture_path(self, i: int) -> Path | None:
        """The file a folder row was read from; None for a tar sample (read by streaming its shard)."""
        return None if is_tar_source(self.sources[i]) else Path(self.sources[i]) / self.keys[i]


def cache_rows(cache: Path, index: Index) -> CacheRows:
    """Folder rows named by their full path (what to open, move or relabel), tar rows by `shard#key` (the shard's
    recorded path or URL and the sample's key)."""
    sources = [index.sources[s] for s in index.source.tolist()]
    keys = [os.fsdecode(p) for p in index.paths]
    names = [f"{s}#{k}" if is_tar_source(s) else os.path.join(s, k) for s, k in zip(sources, keys, strict=True)]
    return CacheRows(cache, names, sources, keys, list(index.sha256), np.asarray(index.labels, np.int64),
                     list(index.classes))
