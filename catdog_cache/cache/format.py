"""The HDF5 feature cache's schema and the records it holds (no h5py here: see validate, read, parts).

Layout (schema 1), one file, rows sorted by (source, relative path):
  attrs     schema_version, provenance (JSON), class_map (JSON), sources (JSON list of folders), versions (JSON),
            incomplete (optional JSON list: the sources whose last extract was interrupted before its end)
  features  [N, V, 4096] float32|float16, chunks of 64 rows, uncompressed
  paths     [N] variable-length bytes: the relative path exactly as the file system spells it
  source    [N] uint16 index into attrs["sources"]
  labels    [N] int8: an index into class_map ({"cat": 0, "dog": 1} for cat/dog; {} when no folder had labels),
            -1 unlabeled
  sha256    [N] 64-char hex of the file's bytes
  failures/{paths, source, sha256, reasons}: files that could not be decoded, with the reason

Sharded (schema 2, see shards.py): `features.h5` is a small index and the rows live in immutable schema-1 files
`features.h5.shards/NAME.h5`; readers merge them (view.py) into exactly the rows the single file would hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import CacheError, ProvenanceMismatch

SCHEMA_VERSION = 1  # a file of rows: a single-file cache, or one shard of a sharded cache
INDEX_SCHEMA = 2  # a sharded cache's index (shards.py): the shard list and the cache-level attributes
CHUNK_ROWS = 64  # 64 rows: 1 MiB at 4096-d float32 (320 KiB at 1280-d): large sequential reads, cheap streaming
CLASS_MAP = {"cat": 0, "dog": 1}  # the Kaggle classes; any labeled image folder records its own (discover.class_names)


@dataclass(frozen=True)
class Provenance:
    """Everything that decides what a feature row means. Equal provenance = interchangeable rows."""

    arch: str
    layer: str
    weights: str
    transform: str
    views: str  # comma-separated, e.g. "center" or "center,flip"
    dtype: str  # storage dtype of features
    precision: str  # compute precision of the backbone: fp32 | bf16 | fp16

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "") -> Provenance:
        """Parse and check a recorded provenance: every field present and a string (it comes from a file)."""
        try:
            data = json.loads(text)
            fields = [f for f in cls.__dataclass_fields__]
            if not isinstance(data, dict) or set(data) != set(fields) or \
                    not all(isinstance(data[k], str) for k in fields):
                raise ValueError("unexpected fields")
            transform = json.loads(data["transform"])  # later parsed as a preset: must be one
            if not isinstance(transform, dict) or not {"resize", "crop", "mean", "std", "interpolation"} <= set(
                    transform) or not data["views"]:
                raise ValueError("transform or views invalid")
            if data["layer"] == "classifier.5":  # what fc7 was called before backbones had layer names
                data["layer"] = "fc7"
            return cls(**{k: data[k] for k in fields})
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise CacheError(f"{where or 'file'} has no valid provenance ({e}): it was not written by catdog-cache "
                             "or is damaged") from None

    def differences(self, other: Provenance, mine: str, theirs: str) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: {mine} has {a[k]}, {theirs} has {b[k]}" for k in a if a[k] != b[k]]


def require_same(have: Provenance, want: Provenance, have_name: str, want_name: str) -> None:
    diffs = have.differences(want, have_name, want_name)
    if diffs:
        raise ProvenanceMismatch(f"{have_name} and {want_name} disagree on how features are made: " + "; ".join(diffs))


@dataclass
class Rows:
    """Rows held in memory before they are written as one part."""

    features: list[np.ndarray] = field(default_factory=list)  # each [V, D]
    paths: list[bytes] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    failed_paths: list[bytes] = field(default_factory=list)
    failed_sha256: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths) + len(self.failed_paths)


@dataclass
class Index:
    """A cache without its features: what is there, and what failed."""

    provenance: Provenance
    sources: list[str]
    source: np.ndarray  # [N] int
    paths: list[bytes]
    labels: np.ndarray  # [N] int8
    sha256: list[str]
    failed: list[tuple[int, bytes, str, str]]  # (source, path, sha256, reason)
    shape: tuple[int, ...]
    dtype: str
    weights_path: str = ""  # where the --weights FILE was when extracted (its sha256 is in the provenance)
    incomplete: list[str] = field(default_factory=list)  # sources whose last extract was interrupted (Ctrl-C)
    classes: list[str] = field(default_factory=lambda: list(CLASS_MAP))  # label i means classes[i]

    @property
    def labeled(self) -> bool:
        return bool((self.labels >= 0).any())

    def keys(self) -> list[tuple[str, bytes]]:
        return [(self.sources[s], p) for s, p in zip(self.source.tolist(), self.paths, strict=True)]

    def known(self, source: str) -> dict[bytes, str]:
        """Relative path -> sha256 of each file of folder `source` held as a row, or as a failure whose content was
        read: what a later extract of that folder need not read again while the hash matches. The one answer to
        "which files are known" for extract (what to do), predict (anything to do?) and scoring a training cache."""
        known = {p: sha for (s, p), sha in zip(self.keys(), self.sha256, strict=True) if s == source}
        known |= {p: sha for s, p, sha, _ in self.failed if self.sources[s] == source and sha}
        return known


def merge_classes(inputs: list[tuple[list[str], bool]], where: str) -> list[str]:
    """The classes of a cache assembled from inputs [(classes, holds labeled rows)]: those holding labels must name
    the same classes in the same order (extract maps a folder's labels onto the cache's classes before writing);
    the others' lists mean nothing. Labels index the list: merging two orders would silently relabel rows."""
    labeled = [c for c, has in inputs if has]
    for c in labeled[1:]:
        if c != labeled[0]:
            raise CacheError(f"{where}: the parts label with different classes ({', '.join(labeled[0])} vs "
                             f"{', '.join(c)}); refusing to merge them")
    if labeled:
        return labeled[0]
    named = [c for c, _ in inputs if c]
    return named[-1] if named else []


def encode_path(rel: str) -> bytes:
    return os.fsencode(rel)  # surrogate-escaped bytes come back exactly
