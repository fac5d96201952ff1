"""`catdog-cache bench --only rerun`: a rerun on an unchanged folder against a plain os.scandir + stat walk of it.

The folder holds n small synthetic files (not images: nothing is decoded); its cache is built synthetically (one
part of rows carrying the files' sha256 and stats, assembled), so no backbone runs. Measured in this process,
interleaved: the walk, the rerun (extract deciding by stat), and the old behaviour (extract --checksum: every file
hashed). Bytes read come from /proc/self/io (rchar: every read, the cache's own included) and from counting the
folder's files that were hashed."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

Row = tuple[str, str, str]  # (what, value, note)
FILE_BYTES = 8192  # a small file: a thumbnail's size


def _rchar() -> int:
    """Bytes this process has read through read() calls so far (page cache hits included)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def make_folder(root: Path, n: int, size: int = FILE_BYTES) -> Path:
    """n files of `size` random bytes, Kaggle-named, last written an hour ago (outside the racy window)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    then = time.time_ns() - 3600 * 10**9
    for i in range(n):
        p = root / f"{'cat' if i % 2 else 'dog'}.{i}.jpg"
        p.write_bytes(rng.bytes(size))
        os.utime(p, ns=(then, then))
    return root


def synthetic_cache(root: Path, cache: Path, cfg: object, dim: int = 16) -> None:
    """A cache of every file of `root` as extract would leave it (sha256, stat, this scan's time), features of
    width `dim` (a rerun never reads them)."""
    from ..cache import Rows, assemble, encode_path, write_part
    from ..extract.config import versions
    from ..extract.rerun import sha256_file
    from ..sources.folder import discover

    scan_ns = time.time_ns()
    disc = discover(root)
    prov = cfg.provenance()  # type: ignore[attr-defined]
    n = len(disc.samples)
    zero = np.zeros((1, dim), np.float32)  # [V, D]
    rows = Rows(features=[zero] * n, paths=[encode_path(s.rel) for s in disc.samples],
                labels=[s.label for s in disc.samples], sha256=[sha256_file(root / s.rel) for s in disc.samples],
                stat=disc.stat.tolist() if disc.stat is not None else [])
    write_part(cache, "part-synthetic", prov, str(root.resolve()), rows, versions(), (1, dim), scan_ns=scan_ns)
    assemble(cache, prov, versions(), dim=dim)


def walk(root: Path) -> int:
    """The baseline: os.scandir + os.stat of every entry, nothing else."""
    n = 0
    for entry in os.scandir(root):
        os.stat(entry.path)
        n += 1
    return n


def run(n: int, log: Callable[[Row], None], repeats: int = 3, where: Path | None = None) -> list[Row]:
    from ..backbone import WeightsSpec
    from ..engines.dispatch import extract
    from ..extract import rerun
    from ..extract.config import ExtractConfig

    cfg = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0)
    table: list[Row] = []

    def add(what: str, value: str, note: str = "") -> None:
        table.append((what, value, note))
        log((what, value, note))

    hashed: list[int] = []
    real = rerun.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.stat().st_size)
        return real(path)

    with tempfile.TemporaryDirectory(dir=where) as tmp:
        t = time.perf_counter()
        root = make_folder(Path(tmp) / "data", n)
        cache = Path(tmp) / "features.h5"
        synthetic_cache(root, cache, cfg)
        total = n * FILE_BYTES
        add(f"rerun setup: {n:,} files of {FILE_BYTES // 1024} KiB + their cache", f"{time.perf_counter() - t:.1f} s",
            f"cache {os.path.getsize(cache) / 2**20:.1f} MiB")
        rerun.sha256_file = counting  # type: ignore[assignment]
        try:
            times: dict[str, list[float]] = {"walk": [], "stat": [], "checksum": []}
            reads: dict[str, tuple[int, int]] = {}
            for r in range(repeats):  # interleaved: the machine's mood changes for all three alike
                for mode in ("walk", "stat", "checksum") if r < 2 else ("walk", "stat"):
                    hashed.clear()
                    before, t = _rchar(), time.perf_counter()
                    if mode == "walk":
                        walk(root)
                    else:
                        rep = extract(root, cache, cfg, checksum=mode == "checksum")
                        assert rep.extracted == 0 and rep.reused == n, (rep.extracted, rep.reused)
                    times[mode].append(time.perf_counter() - t)
                    reads[mode] = (_rchar() - before, sum(hashed))
        finally:
            rerun.sha256_file = real  # type: ignore[assignment]
    base = float(np.median(times["walk"]))
    add(f"os.scandir + stat walk, {n:,} files", f"{base:.3f} s", f"median of {len(times['walk'])}")
    for mode, what in (("stat", "rerun by stat (extract, unchanged folder)"),
                       ("checksum", "rerun hashing all (extract --checksum, the old behaviour)")):
        med = float(np.median(times[mode]))
        rchar, folder = reads[mode]
        add(what, f"{med:.3f} s", f"{med / base:.2f}x the walk; folder bytes read {folder / total:.2%} "
            f"({folder / 2**20:.1f} of {total / 2**20:.0f} MiB); rchar {rchar / 2**20:.1f} MiB (cache included)")
    return table


def main() -> None:  # python -m catdog_cache.bench.rerun [N]
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    run(n, lambda row: print(" | ".join(row), flush=True))


if __name__ == "__main__":
    main()
