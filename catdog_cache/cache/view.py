"""The logical cache: immutable shards merged into one sorted view of rows, without copying any row.

A reader sees rows sorted by (source order, relative path), one row per file: a later shard's row replaces an
earlier one (a changed file), a later failure record removes an older row, a deletion record (--prune) removes the
rows of the shards listed before it. This is exactly what assemble's single file holds, so a sharded cache, its
compacted form and a schema-1 file give the same Index and the same features in the same order.

Cost: one extract run writes shards in sorted, non-overlapping order, so the common case is a check that the
concatenated keys increase (numpy, no sort); otherwise a stable sort per source folder (timsort: linear for a few
sorted runs). The view maps logical rows to (shard, row) as runs of consecutive rows, one per shard in the common
case, so reading logical rows [lo, hi) is one slice per run."""

from __future__ import annotations

import bisect
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..files import printable
from .chunk_reads import Direct, identity
from .format import CHUNK_ROWS, MAX_SOURCES, STAT_WIDTH, Index, Provenance, merge_classes, require_same, unknown_stats
from .opening import open_h5, open_h5_fd, open_regular
from .packed_index import PackedPaths, Unread, scan_view, unknown_stat_view
from .validate import file_index

MAX_OPEN = 64  # shard files held open at once by one reader


@dataclass
class Tombstone:
    """Rows of `path` in folder `source` are removed from the shards listed before position `before`."""

    source: str
    path: bytes
    before: int


@dataclass
class View:
    """A merged cache: its Index, and where each logical row lies (runs of consecutive rows of one shard)."""

    index: Index
    shards: list[Path]
    shard_rows: list[int]  # rows in each shard file
    seg_start: np.ndarray  # [S+1] logical row where each run starts (last entry: N)
    seg_shard: np.ndarray  # [S] shard of each run
    seg_row: np.ndarray  # [S] first row of the run in its shard
    shard_bytes: list[int] = field(default_factory=list)  # size of each shard file when the view was built
    shard_ids: list[tuple[int, int, int]] = field(default_factory=list)  # chunk_reads.identity() of each, validated
    _open: OrderedDict[int, h5py.File] = field(default_factory=OrderedDict)
    _owned: dict[int, h5py.File] = field(default_factory=dict)  # handles given by the caller: never closed here
    _scratch: dict[str, np.ndarray] = field(default_factory=dict)  # stored dtype -> a reused read buffer
    _feats: dict[int, h5py.Dataset] = field(default_factory=dict)  # open shard -> its features (one lookup per open)
    _direct: Direct | None = None  # pread past HDF5 (chunk_reads.py), made on the first read

    @property
    def rows(self) -> int:
        return self.index.shape[0]

    def runs(self, lo: int = 0, hi: int | None = None) -> list[tuple[int, int, int, int]]:
        """(shard, first row in it, logical start, length) of each run that covers logical rows [lo, hi)."""
        hi = self.rows if hi is None else min(hi, self.rows)
        out = []
        s = max(int(np.searchsorted(self.seg_start, lo, side="right")) - 1, 0)
        while lo < hi and s < len(self.seg_shard):
            start, end = int(self.seg_start[s]), int(self.seg_start[s + 1])
            if start >= hi:  # past the rows asked for: a chunk read must not walk every later run
                break
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out.append((int(self.seg_shard[s]), int(self.seg_row[s]) + a - start, a, b - a))
            s += 1
        return out

    def handle(self, i: int) -> h5py.File:
        if i in self._owned:
            return self._owned[i]
        f = self._open.get(i)
        if f is None:
            if len(self._open) >= MAX_OPEN:
                j, old = self._open.popitem(last=False)
                self._feats.pop(j, None)
                old.close()
            ident = self.shard_ids[i] if i < len(self.shard_ids) else None
            try:
                # opened once, not following a link, never waiting (a FIFO swapped in is refused, not a hang)
                fd, st = open_regular(self.shards[i], follow=False)
            except CacheError:
                raise CacheError(f"{self.shards[i]} vanished or changed while reading (a compact or a new extract?):"
                                 " run again") from None
            try:
                # the file opened must be the one validated (a swap is never followed into its links or storage);
                # shards are immutable. No chunk cache: each chunk is read once per epoch, whole, into its slot
                # (64 open shards x 1 MiB of cache would be budget spent on nothing)
                if ident is not None and identity(st) != ident:
                    raise CacheError(f"{self.shards[i]} changed while reading: run again")
                f = open_h5_fd(fd, self.shards[i], rdcc_nbytes=0)
            finally:
                os.close(fd)
            if f["features"].shape[0] != self.shard_rows[i]:
                f.close()
                raise CacheError(f"{self.shards[i]} changed while reading: run again")
            self._open[i] = f
        else:
            self._open.move_to_end(i)
        return f

    def prefetch(self, lo: int, hi: int) -> None:
        """Logical rows [lo, hi) will be read soon: their reads start now, in the background (Direct.advise)."""
        if self._direct is None:
            self._direct = Direct(self.shards, self.shard_bytes, self.shard_ids)
        if self.index.shape[1] == 1:
            for i, r0, _, length in self.runs(lo, hi):
                self._direct.advise(i, self.shard_rows[i], r0, length)

    def read(self, lo: int, hi: int, view: int | None = 0, dtype: np.dtype | str | None = np.float32,
             out: np.ndarray | None = None) -> np.ndarray:
        """Logical rows [lo, hi): [n, D] for one view, [n, V, D] for view=None; float32 unless dtype says.
        `out`: an array of that shape and dtype to fill (a streamed fit's reused slots: a fresh 320 KiB array per
        chunk is a fresh mmap, and its page faults can cost more than the read)."""
        hi = min(hi, self.rows)
        n = max(hi - lo, 0)
        _, v, d = self.index.shape
        if out is None:
            out = np.empty((n, d) if view is not None else (n, v, d), dtype=dtype or self.index.dtype)
        if self._direct is None:
            self._direct = Direct(self.shards, self.shard_bytes, self.shard_ids)
        for i, r0, start, length in self.runs(lo, hi):
            o = out[start - lo : start - lo + length]
            if view is not None and v == 1 and self._direct.read(i, self.shard_rows[i], r0, o, self._scratch):
                continue
            ds = self._feats.get(i) if i in self._open or i in self._owned else None
            if ds is None:
                ds = self._feats[i] = self.handle(i)["features"]
            else:
                self.handle(i)  # most recently used
            if view is None:
                o[...] = ds[r0 : r0 + length]
            elif v == 1 and ds.dtype == o.dtype:  # straight into the output: no temporary (the common case)
                ds.read_direct(o.reshape(length, 1, d), np.s_[r0 : r0 + length])
            elif v == 1:  # float16 on disk: into a reused buffer, converted by numpy (HDF5's own conversion is slow)
                buf = self._scratch.get(ds.dtype.str)
                if buf is None or len(buf) < length:
                    buf = self._scratch[ds.dtype.str] = np.empty((max(length, CHUNK_ROWS), 1, d), ds.dtype)
                ds.read_direct(buf[:length], np.s_[r0 : r0 + length])
                o[...] = buf[:length, 0]
            else:
                o[...] = ds[r0 : r0 + length, view, :]
        return out

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        for f in self._open.values():
            f.close()
        self._open.clear()
        self._feats.clear()


def _natural(name: str) -> list[str | int]:
    """Sort key: digit runs compared as numbers (train-2.tar before train-10.tar, as a listing names them)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _keys(paths: list[bytes]) -> np.ndarray:
    return np.array(paths, dtype=bytes) if paths else np.zeros(0, "S1")  # [n] fixed-width: numpy compares bytes


def _increasing(src: np.ndarray, paths: Sequence[bytes]) -> bool:
    """Keys (src[i], paths[i]) strictly increasing: numpy on the folders, one C-level pass over the paths (no
    fixed-width copy of them: N x the longest path would be gigabytes at 10M rows with one long name). Two
    iterators, no slices: a lean index's packed paths are never all made into objects at once."""
    if len(paths) < 2:
        return True
    nxt = iter(paths)
    next(nxt)
    lt = np.fromiter(map(operator.lt, iter(paths), nxt), bool, len(paths) - 1)  # [n-1] path[i] < path[i+1]
    # compared, not differenced: a lean index's folders are uint16, whose differences wrap around
    return bool(((src[1:] > src[:-1]) | ((src[1:] == src[:-1]) & lt)).all())


def merge(shards: list[tuple[Path, Index]], sources: list[str], tombstones: list[Tombstone], prov: Provenance,
          feature_shape: tuple[int, int], weights_path: str, incomplete: list[str], where: Path,
          check_prov: bool = True, classes: list[str] | None = None, lean: bool = False) -> View:
    """Shards (validated, in order) -> the View. `sources` is the cache's folder list; a shard folder it lacks is a
    crafted or damaged index (check_prov False: a writer adding shards extends it in order, as assemble did).
    Each shard keeps its own class_map; the cache's classes are merged as assemble merges them (labeled shards must
    agree). `classes`: what the index recorded, which must be that merge (a crafted class_map would relabel rows).
    lean: the shards were read lean (validate.file_index): the result is too (paths packed, sha256 and stat unread)."""
    sources = list(sources)
    if not check_prov:  # a writer adopting shards: new folders join in natural order, not in the order their parts
        # were named (loader workers and torchrun ranks finish tar shards in any order; rows must not depend on it)
        sources += sorted({s for _, idx in shards for s in idx.sources} - set(sources), key=_natural)
    merged_classes = merge_classes([(idx.classes, idx.labeled) for _, idx in shards], str(where))
    if classes is not None and classes != merged_classes:
        raise CacheError(f"{where} records the classes {printable(', '.join(classes))[:200]!r}, its shards label "
                         f"with {printable(', '.join(merged_classes))[:200]!r}: refusing a crafted cache")
    src_parts, lab_parts, sha_parts, path_parts, rows_of = [], [], [], [], []
    stat_parts, scan_parts = [], []
    for path, idx in shards:
        if check_prov:
            if idx.provenance != prov:
                raise CacheError(f"{path}: its provenance differs from the index {where}; refusing a crafted cache")
        else:
            require_same(idx.provenance, prov, str(path), "this run")
        if idx.shape[1:] != tuple(feature_shape) or idx.dtype != prov.dtype:
            raise CacheError(f"{path} has features of shape {idx.shape[1:]} {idx.dtype}, the cache "
                             f"{tuple(feature_shape)} {prov.dtype}: refusing it")
        for s in idx.sources:
            if s not in sources:
                if check_prov:
                    raise CacheError(f"{path} holds rows of folder {printable(s)!r} that {where} does not list: "
                                     "refusing a crafted cache")
                sources.append(s)
        pos = np.array([sources.index(s) for s in idx.sources], np.uint16 if lean else np.int64)
        src_parts.append(pos[idx.source] if len(idx.source) else np.zeros(0, pos.dtype))
        lab_parts.append(idx.labels)
        sha_parts.append(idx.sha256)
        path_parts.append(idx.paths)
        stat_parts.append(idx.stat)
        scan_parts.append(idx.stat_scan)
        rows_of.append(idx.shape[0])
    if len(sources) > MAX_SOURCES:
        raise CacheError(f"{where} would hold {len(sources)} source folders; the schema allows {MAX_SOURCES:,}")
    n_all = sum(rows_of)
    src = np.concatenate(src_parts) if src_parts else np.zeros(0, np.int64)  # [n_all]
    # [n_all] the paths, concatenated: references, no copy (lean: one buffer, see packed_index.PackedPaths)
    key = PackedPaths.concat(path_parts) if lean else [p for part in path_parts for p in part]
    first = np.concatenate([[0], np.cumsum(rows_of)]).astype(np.int64)  # [S+1] where each shard's rows start

    def shard_at(pos: np.ndarray) -> np.ndarray:
        """Shard of each position in the concatenated rows (no [n_all] table of them: 80 MB at 10M rows)."""
        return np.searchsorted(first, pos, side="right") - 1

    # common case: keys already strictly increasing by (source, path) across the shards: no sort at all
    ident = _increasing(src, key)
    order = None  # positions in the concatenated shards, sorted by key; None: the identity
    if not ident:  # per folder, a stable sort (earlier shard first among equal keys), then the last of each key wins
        order_parts = []
        for s in np.unique(src).tolist():
            sel = np.flatnonzero(src == s).tolist()
            o = sorted(sel, key=key.__getitem__)  # timsort, stable: linear for a few sorted runs
            last = [a for a, b in zip(o, o[1:], strict=False) if key[a] != key[b]] + o[-1:]
            order_parts.append(np.array(last, np.int64))
        order = np.concatenate(order_parts) if order_parts else np.zeros(0, np.int64)
    s_sorted = src if order is None else src[order]
    k_sorted = key if order is None else [key[i] for i in order.tolist()]  # sorted paths within each folder

    def find(s: int, p: bytes) -> int:
        """Position in `order` of key (s, p), or -1."""
        lo, hi = int(np.searchsorted(s_sorted, s, "left")), int(np.searchsorted(s_sorted, s, "right"))
        j = bisect.bisect_left(k_sorted, p, lo, hi)
        return j if j < hi and k_sorted[j] == p else -1

    def shard_of(j: int) -> int:
        return int(shard_at(np.array([j if order is None else order[j]]))[0])

    drop: list[int] = []  # positions in `order` of rows a failure or a deletion record removes
    failed: dict[tuple[str, bytes], tuple[int, str, str]] = {}  # key -> (shard, sha, reason); later wins
    failed_stat: dict[tuple[str, bytes], tuple[np.ndarray, int]] = {}  # key -> (stat [4], its scan time)
    for i, (_, idx) in enumerate(shards):
        assert idx.failed_stat is not None and idx.failed_scan is not None
        for (s, p, sha, reason), st, scan in zip(idx.failed, idx.failed_stat, idx.failed_scan.tolist(), strict=True):
            failed[(idx.sources[s], p)] = (i, sha, reason)
            failed_stat[(idx.sources[s], p)] = (st, scan)
    for k, (i, _, _) in list(failed.items()):
        j = find(sources.index(k[0]), k[1])
        if j >= 0:
            if shard_of(j) > i:  # a later row: the file was fixed
                del failed[k]
            else:  # a failure at or after the row's shard replaces it
                drop.append(j)
    for t in tombstones:
        if t.source not in sources:
            continue
        j = find(sources.index(t.source), t.path)
        if j >= 0 and shard_of(j) < t.before:
            drop.append(j)
        if (t.source, t.path) in failed and failed[(t.source, t.path)][0] < t.before:
            del failed[(t.source, t.path)]
    whole = order is None and not drop  # every row in shard order: the concatenated columns as they are
    if whole:
        final = None
        n = n_all
        nonempty = np.flatnonzero(np.asarray(rows_of, np.int64) > 0)  # one run per shard holding rows
        seg_start, seg_shard, seg_row = first[nonempty], nonempty, np.zeros(len(nonempty), np.int64)
    else:
        keep = np.ones(n_all if order is None else len(order), bool)
        keep[drop] = False
        final = np.flatnonzero(keep) if order is None else order[keep]  # [N] positions, logical order
        n = len(final)
        fs = shard_at(final)
        fr = final - first[fs]
        brk = np.ones(n, bool)
        brk[1:] = (fs[1:] != fs[:-1]) | (fr[1:] != fr[:-1] + 1)
        starts = np.flatnonzero(brk)
        seg_start, seg_shard, seg_row = starts, fs[starts], fr[starts]

    def pick(a: np.ndarray) -> np.ndarray:
        return a if final is None else a[final]

    if lean:  # not read (packed_index.Unread): fit needs neither, and no refresh record can change which rows live
        paths_final = key if final is None else key.take(final)
        sha_final = Unread("sha256", n)
        stat, scan = unknown_stat_view(n), scan_view(n)
    else:
        sha = [h for part in sha_parts for h in part]  # [n_all]
        paths_final = key if final is None else [key[i] for i in final.tolist()]  # [N]
        sha_final = sha if final is None else [sha[i] for i in final.tolist()]  # [N]
        stat = pick(np.concatenate(stat_parts)) if stat_parts else unknown_stats(0)  # [N, STAT_WIDTH]
        scan = pick(np.concatenate(scan_parts)) if scan_parts else np.zeros(0, np.int64)  # [N]
        if any(len(idx.refresh) for _, idx in shards):  # fixed-width keys only for a rerun's refresh records
            origin = shard_at(np.arange(n_all) if final is None else final)  # [N] each row's shard
            _refresh(shards, sources, pick(src), _keys(paths_final), origin, np.array(sha_final, dtype=object),
                     stat, scan, failed, failed_stat)
    src_id = {s: j for j, s in enumerate(sources)}
    index = Index(
        provenance=prov,
        sources=sources,
        source=pick(src).astype(np.uint16 if lean else np.int64, copy=False),  # lean: 2 bytes a row, as stored
        paths=paths_final,
        labels=pick(np.concatenate(lab_parts) if lab_parts else np.zeros(0, np.int64)).astype(np.int8, copy=False),
        sha256=sha_final,
        failed=[(src_id[k[0]], k[1], sha, reason) for k, (_, sha, reason) in sorted(failed.items())],
        shape=(n, *feature_shape),
        dtype=prov.dtype,
        weights_path=weights_path,
        incomplete=[s for s in sources if s in incomplete],
        classes=merged_classes,
        stat=stat,
        stat_scan=scan,
        failed_stat=np.array([failed_stat[k][0] for k in sorted(failed)], np.int64).reshape(-1, STAT_WIDTH),
        failed_scan=np.array([failed_stat[k][1] for k in sorted(failed)], np.int64),
        scan_ns=int(max((idx.scan_ns for _, idx in shards), default=0)),
    )
    return View(index, [p for p, _ in shards], rows_of, np.append(seg_start, n).astype(np.int64),
                np.asarray(seg_shard, np.int64), np.asarray(seg_row, np.int64))


def _refresh(shards: list[tuple[Path, Index]], sources: list[str], src: np.ndarray, key: np.ndarray,
             origin: np.ndarray, sha: np.ndarray, stat: np.ndarray, scan: np.ndarray,
             failed: dict[tuple[str, bytes], tuple[int, str, str]],
             failed_stat: dict[tuple[str, bytes], tuple[np.ndarray, int]]) -> None:
    """Apply each shard's refresh records (cache.format.Refresh) to the live rows, in place: a record replaces the
    stat (and its scan time) of the row with its key and its sha256 from the same or an earlier shard; shards in
    order, so the newest stat wins. `src`, `key` [N] are the live rows' sorted keys, `origin` [N] the shard each
    row's stat now comes from. Vectorised per folder: a cache older than stats gets a record for every file once."""
    for i, (_, idx) in enumerate(shards):
        ref = idx.refresh
        if not len(ref):
            continue
        pos = np.array([sources.index(s) for s in idx.sources], np.int64)[ref.source]  # [K] folder in `sources`
        rkey = _keys(ref.paths)
        rsha = np.array(ref.sha256, dtype=object)
        for s in np.unique(pos).tolist():
            sel = np.flatnonzero(pos == s)
            lo, hi = np.searchsorted(src, s, "left"), np.searchsorted(src, s, "right")
            j = lo + np.searchsorted(key[lo:hi], rkey[sel])  # [k] candidate rows
            ok = j < hi
            ok[ok] = key[j[ok]] == rkey[sel][ok]
            ok[ok] &= (sha[j[ok]] == rsha[sel][ok]) & (origin[j[ok]] <= i)
            rows, recs = j[ok], sel[ok]
            stat[rows], scan[rows], origin[rows] = ref.stat[recs], idx.scan_ns, i
            for r in sel[~ok].tolist():  # not a live row: a failure record holding that content
                k = (sources[s], ref.paths[r])
                if k in failed and failed[k][1] == ref.sha256[r] and failed[k][0] <= i:
                    failed_stat[k] = (ref.stat[r], idx.scan_ns)


def single_file(f: h5py.File, path: Path, lean: bool = False) -> View:
    """A schema-1 cache (or one shard) read as it is: one run over its own, already open file."""
    idx = file_index(f, path, lean=lean)
    n = idx.shape[0]
    view = View(idx, [path], [n], np.array([0, n] if n else [0], np.int64), np.zeros(1 if n else 0, np.int64),
                np.zeros(1 if n else 0, np.int64))
    view._owned[0] = f
    st = os.fstat(f.id.get_vfd_handle())  # the file read, never the name looked up again
    view.shard_bytes, view.shard_ids = [st.st_size], [identity(st)]
    return view


def shard_index(path: Path, st: os.stat_result | None = None, lean: bool = False) -> Index:
    """One shard file's own index, validated as any cache file (opened once, never through a link, never a FIFO).
    `st`: the caller's lstat of it, just taken and checked: the file opened must be that one. lean: see file_index."""
    if st is None and not os.path.lexists(path):
        raise CacheError(f"{path} is missing: the cache lists it; restore it or extract again into a new cache")
    with open_h5(path, follow=False) as f:
        fst = os.fstat(f.id.get_vfd_handle())
        if st is not None and identity(fst) != identity(st):
            raise CacheError(f"{path} was replaced while it was read: run again")
        return file_index(f, path, fst.st_size, lean)
