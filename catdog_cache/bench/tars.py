"""`bench --only tars`: WebDataset tar input against the same images as a folder, and what an append writes.

Tar rows: the same n JPEGs (drawn, or --data's) extracted from their folder, from one tar and from four tars, with
one backbone built once, interleaved rounds, medians reported as ratios to the folder. Append row: bytes written
(/proc/self/io wchar) when 10 rows join a 20,000-row 4096-d float32 sharded cache, against the cache's size (issue
18 asks < 5 MB; assembling one file used to rewrite all of it)."""

from __future__ import annotations

import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

Row = tuple[str, str, str]


def _wchar() -> int:
    """Bytes this process has written through write() calls so far (-1 where /proc/self/io is missing)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def tar_inputs(folder: Path, where: Path) -> dict[str, str]:
    """The folder's images as one tar and as four (every 4th name each), members named as the files."""
    from ..sources.folder import discover

    names = [s.rel for s in discover(folder).samples]
    with tarfile.open(where / "one.tar", "w") as tf:
        for n in names:
            tf.add(folder / n, arcname=n)
    for k in range(4):
        with tarfile.open(where / f"four-{k}.tar", "w") as tf:
            for n in names[k::4]:
                tf.add(folder / n, arcname=n)
    return {"folder": str(folder), "1 tar": str(where / "one.tar"), "4 tars": str(where / "four-{0..3}.tar")}


def tars_vs_folder(folder: Path, log: Callable[[Row], None], backbone: str = "tiny", repeats: int = 3
                   ) -> list[Row]:
    from ..backbone import WeightsSpec
    from ..engines.dispatch import extract
    from ..extract.config import ExtractConfig

    cfg = ExtractConfig(WeightsSpec("random"), backbone=backbone, device="cpu")
    model = cfg.resolve().build(cfg.weights)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = tar_inputs(folder, Path(tmp))
        rates: dict[str, list[float]] = {k: [] for k in inputs}
        for r in range(repeats):  # interleaved: the machine's mood changes for all three alike
            for k, spec in inputs.items():
                t = time.perf_counter()
                rep = extract(spec, Path(tmp) / f"c-{r}-{k.replace(' ', '')}.h5", cfg, model=model)
                rates[k].append(rep.extracted / (time.perf_counter() - t))
        base = statistics.median(rates["folder"])
        for k, v in rates.items():
            med = statistics.median(v)
            rows.append((f"extract from {k} ({backbone}, {rep.extracted} images)", f"{med:.1f} img/s",
                         f"{med / base:.2f}x the folder; median of {repeats}, interleaved"))
            log(rows[-1])
    return rows


def append_bytes(log: Callable[[Row], None], rows: int = 20_000, add: int = 10, dim: int = 4096) -> list[Row]:
    """Write `rows` synthetic rows as shards, finish, then time and count the bytes of adding `add` more."""
    from ..backbone import IMAGENET
    from ..cache import Provenance, Rows, finish, write_part

    prov = Provenance("synthetic", "fc7", "random:seed=0", IMAGENET.spec(), "center", "float32", "fp32")
    rng = np.random.default_rng(0)

    def block(names: list[str]) -> Rows:
        return Rows(features=list(rng.normal(0, 1, (len(names), 1, dim)).astype(np.float32)),
                    paths=[n.encode() for n in names], labels=[i % 2 for i in range(len(names))],
                    sha256=["0" * 64] * len(names))

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "features.h5"
        for k in range(0, rows, 1000):
            write_part(cache, f"part-{k:020d}-0-000000", prov, "/src",
                       block([f"{i:09d}.jpg" for i in range(k, min(k + 1000, rows))]), {}, (1, dim))
        finish(cache, prov, {}, dim=dim)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        w0, t0 = _wchar(), time.perf_counter()
        write_part(cache, f"part-{rows:020d}-0-000000", prov, "/src",
                   block([f"{i:09d}a.jpg" for i in range(0, rows, rows // add)][:add]), {}, (1, dim))
        index = finish(cache, prov, {}, dim=dim)
        written, seconds = _wchar() - w0, time.perf_counter() - t0
    row = (f"append {add} rows to a {rows:,}-row {dim}-d float32 cache", f"{written / 2**20:.2f} MiB written",
           f"in {seconds:.2f} s; the cache is {size / 2**20:.0f} MiB ({index.shape[0]:,} rows after); target < 5 MB")
    log(row)
    return [row]


def run(data_dir: Path | None, n: int, log: Callable[[Row], None], repeats: int = 3) -> list[Row]:
    from .pipeline import photo_like

    rows = append_bytes(log)
    if data_dir is not None:
        return rows + tars_vs_folder(data_dir, log, repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        return rows + tars_vs_folder(photo_like(Path(tmp) / "photos", n), log, repeats=repeats)
