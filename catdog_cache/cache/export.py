"""A cache's rows out to NumPy (.npz) or Parquet, for scikit-learn and pandas: features with their labels, paths and
source folders, in the cache's row order (the one reader's, so the rows are exactly what fit trains on).

Memory stays bounded for caches larger than memory: features are read and written a block of rows at a time. An
.npz is a zip of .npy files, written here uncompressed, each member streamed (its .npy header first, then the
blocks), so np.load reads it as any np.savez file. A Parquet file gets one row group per block (pyarrow, only when it
is installed)."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..files import check_outputs, temp_beside
from .format import CHUNK_ROWS, Index
from .read import open_cache
from .view import View

FORMATS = (".npz", ".parquet")
BLOCK_BYTES = 64 << 20  # features read and written at a time


@dataclass
class Exported:
    out: Path
    rows: int
    dim: int
    views: list[str]  # `features` is the first; each further view is `features_<name>`
    arrays: list[str] = field(default_factory=list)  # the .npz members or the Parquet columns, in order


def export_features(cache: str | os.PathLike[str], out: str | os.PathLike[str],
                    progress: Callable[[str, int, int], None] | None = None, block_bytes: int = BLOCK_BYTES
                    ) -> Exported:
    """Write every row of a cache to `out` (.npz or .parquet, by its suffix): `features` [N, D] float32 (the first
    view; a cache of several views adds `features_<view>` for each other), `labels` [N] (-1 unlabeled), `paths` [N]
    (each file's path inside its source), `source` [N] (an index into `sources`), `sources`, `classes`, and the
    feature provenance. Written to a temp file renamed into place: a failed export leaves no half file."""
    cache, out = Path(cache), Path(out)
    kind = out.suffix.lower()
    if kind not in FORMATS:
        raise InputError(f"--out {out}: expected a .npz (NumPy) or .parquet (pandas) file name")
    pq = _pyarrow(out) if kind == ".parquet" else None  # refused before the cache is read
    check_outputs({"--out": out}, {"--cache": cache})
    with open_cache(cache, lean=True) as (view, idx):  # lean: the paths packed, no sha256 or stat read
        n, v, d = idx.shape
        views = idx.provenance.views.split(",")
        block = max(CHUNK_ROWS, block_bytes // (d * 4) // CHUNK_ROWS * CHUNK_ROWS)  # whole chunks
        report = Exported(out, n, d, views)
        with temp_beside(out) as tmp:
            if pq is None:
                _write_npz(tmp, view, idx, views, block, report, progress)
            else:
                _write_parquet(pq, tmp, view, idx, views, block, report, progress)
    return report


def _pyarrow(out: Path) -> Any:
    """pyarrow.parquet, or one line naming the package to install (an optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"--out {out}: writing Parquet needs pyarrow: pip install 'catdog-cache[parquet]' "
                         "(or give --out FILE.npz)") from None
    return pq


def _texts(idx: Index, lo: int, hi: int) -> list[str]:
    """Paths [lo, hi) as str: undecodable bytes kept as surrogate escapes (os.fsencode gives the bytes back)."""
    return [os.fsdecode(idx.paths[i]) for i in range(lo, hi)]


def _blocks(view: View, n: int, block: int, k: int, progress: Callable[[str, int, int], None] | None
            ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(lo, hi, features [hi - lo, D] float32) of view k, one block at a time."""
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        yield lo, hi, view.read(lo, hi, k)
        if progress:
            progress("export", hi, n)


def _write_npz(tmp: Path, view: View, idx: Index, views: list[str], block: int, report: Exported,
               progress: Callable[[str, int, int], None] | None) -> None:
    n, _, d = idx.shape
    width = max((len(os.fsdecode(p)) for p in idx.paths), default=1) or 1  # one pass: fixed-width str, no pickle

    def member(z: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...],
               parts: Iterator[np.ndarray]) -> None:
        """One .npy member, streamed: its header, then each part's bytes (never the whole array in memory)."""
        with z.open(f"{name}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": shape})
            for part in parts:
                fh.write(np.ascontiguousarray(part, dtype).data)
        report.arrays.append(name)

    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, name in enumerate(views):
            member(z, "features" if k == 0 else f"features_{name}", np.dtype(np.float32), (n, d),
                   (x for _, _, x in _blocks(view, n, block, k, progress)))
        member(z, "labels", np.dtype(np.int8), (n,), iter([idx.labels]))
        member(z, "paths", np.dtype(f"<U{width}"), (n,),
               (np.array(_texts(idx, lo, min(lo + block, n)), f"<U{width}") for lo in range(0, n, block)))
        member(z, "source", np.dtype(np.uint16), (n,), iter([idx.source]))
        for name, texts in (("sources", idx.sources), ("classes", idx.classes),
                            ("provenance", [idx.provenance.to_json()])):
            arr = np.array(texts, dtype=str) if texts else np.zeros(0, "<U1")
            member(z, name, arr.dtype, arr.shape if name != "provenance" else (), iter([arr]))


def _write_parquet(pq: Any, tmp: Path, view: View, idx: Index, views: list[str], block: int,
                   report: Exported, progress: Callable[[str, int, int], None] | None) -> None:
    import pyarrow as pa

    n, _, d = idx.shape
    # a path column of str when every path is UTF-8 (the usual case), else of bytes: Arrow strings must be UTF-8
    utf8 = all(_is_utf8(p) for p in idx.paths)
    names = ["features" if k == 0 else f"features_{name}" for k, name in enumerate(views)]
    sources = pa.array(idx.sources, pa.string())
    classes = pa.array(idx.classes, pa.string())
    meta = {b"catdog_cache": json.dumps({"provenance": json.loads(idx.provenance.to_json()), "sources": idx.sources,
                                         "classes": idx.classes}).encode()}
    writer = None
    try:
        for lo in range(0, n, block) if n else [0]:
            hi = min(lo + block, n)
            cols = {name: pa.FixedSizeListArray.from_arrays(view.read(lo, hi, k).reshape(-1), d)
                    for k, name in enumerate(names)}
            labels = np.asarray(idx.labels[lo:hi], np.int8)
            cols["label"] = pa.array(labels, pa.int8())
            ids = pa.array(np.maximum(labels, 0), pa.int8(), mask=labels < 0)  # unlabeled: null
            cols["class"] = pa.DictionaryArray.from_arrays(ids, classes) if len(idx.classes) else \
                pa.nulls(hi - lo, pa.string())
            paths = [idx.paths[i] for i in range(lo, hi)]
            cols["path"] = pa.array([p.decode() for p in paths], pa.string()) if utf8 else pa.array(paths, pa.binary())
            cols["source"] = pa.DictionaryArray.from_arrays(pa.array(idx.source[lo:hi], pa.uint16()), sources)
            table = pa.table(cols).replace_schema_metadata(meta)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
                report.arrays = table.column_names
            writer.write_table(table)
            if progress:
                progress("export", hi, n)
    finally:
        if writer is not None:
            writer.close()


def _is_utf8(p: bytes) -> bool:
    try:
        p.decode()
    except UnicodeDecodeError:
        return False
    return True
