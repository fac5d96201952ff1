"""`bench --only scale`: a head streamed from a large synthetic sharded cache (issue 18 item 4).

Per size: a sharded cache of N x 1280 float16 rows written with the cache's own writer (shards of --shard-rows),
labels from a fixed linear rule so the head has something to learn; then, in a fresh process each, the open time
(index + every shard validated; lean, as fit opens it), the RSS the open index holds, and a streamed fit under
--max-memory: seconds per epoch, us/row, peak RSS. At the smallest size two budgets must give the same head, bit
for bit. The synthetic cache is deleted after each size (at 10M rows it is 25.6 GB), unless `keep`: then it stays
in the folder as `scale-{rows}x{shard_rows}/` with a DONE marker, and a later run with the same folder reuses a
finished one (10M rows take 11-15 minutes to write here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

Row = tuple[str, str, str]
DIM = 1280
POOL = 65_536  # distinct random rows drawn once; each shard gathers from them (drawing 10M x 1280 normals is minutes)


def synthetic_sharded(cache: Path, rows: int, shard_rows: int = 1024, seed: int = 0) -> float:
    """A sharded cache of `rows` x 1 x 1280 float16, paths `{i:09d}.jpg`, label = [x . w > 0] for a fixed w.
    Returns the seconds spent finishing (adopting every shard into the index)."""
    from ..backbone import IMAGENET
    from ..cache import Provenance, Rows, finish, write_part

    prov = Provenance("synthetic", "pool", "random:seed=0", IMAGENET.spec(), "center", "float16", "fp32")
    rng = np.random.default_rng(seed)
    pool = rng.normal(0, 1, (POOL, 1, DIM)).astype(np.float16)  # [P, 1, D]
    w = rng.normal(0, 1, DIM).astype(np.float32)  # [D] the rule the head can learn
    pool_y = (pool[:, 0, :].astype(np.float32) @ w > 0).astype(np.int64)  # [P]
    for j, s in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - s)
        pick = rng.integers(0, POOL, n)  # [n]
        write_part(cache, f"part-{j:09d}-0-000000", prov, "/synthetic",
                   Rows(features=list(pool[pick]), paths=[f"{s + i:09d}.jpg".encode() for i in range(n)],
                        labels=pool_y[pick].tolist(), sha256=["0" * 64] * n), {}, (1, DIM))
    t = time.perf_counter()
    finish(cache, prov, {}, dim=DIM)
    return time.perf_counter() - t


CHILD = """
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from catdog_cache.cache import open_cache
from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit.data import fit_overhead, mib, parse_size
open("/proc/self/clear_refs", "w").write("5")  # peak (VmHWM) from here: after the imports
base = status("VmRSS")
t = time.perf_counter()
with open_cache(sys.argv[1], lean=True) as (view, index):  # as fit opens it
    opened = time.perf_counter() - t
    index_rss = status("VmRSS") - base
    # the chunk allowance asked for + what --max-memory holds beside the features (the index, per-row arrays)
    budget = mib(parse_size(sys.argv[4]) + fit_overhead(index))
del view, index
r = fit(sys.argv[1], sys.argv[2], FitConfig(epochs=int(sys.argv[3])), max_memory=budget, curve=False)
print(json.dumps({"open_s": opened, "index_rss": index_rss, "base_rss": base, "peak_rss": status("VmHWM"),
                  "max_memory": budget,
                  "streamed": r.streamed, "load_s": r.load_seconds, "epoch_s": [h.seconds for h in r.history],
                  "val_acc": r.val_acc, "n_train": r.n_train, "n_val": r.n_val}))
"""


def fit_child(cache: Path, head: Path, epochs: int, budget: str) -> dict:
    """One open + streamed fit in a fresh process (its RSS is this measurement's alone)."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(cache), str(head), str(epochs), budget], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same_head(a: Path, b: Path) -> bool:
    from ..fit.head import load_head

    (ha, _), (hb, _) = load_head(a), load_head(b)
    sa, sb = ha.state_dict(), hb.state_dict()
    return sa.keys() == sb.keys() and all(bool((sa[k] == sb[k]).all()) for k in sa)


def kept_cache(folder: Path, rows: int, shard_rows: int) -> tuple[Path, bool]:
    """(the cache, whether it is finished) of a kept synthetic cache: `DONE` is written after `finish` returns, so
    a killed write is never reused (it is removed and written again)."""
    tmp = folder / f"scale-{rows}x{shard_rows}"
    return tmp / "features.h5", (tmp / "DONE").is_file()


def run(sizes: list[int], log: Callable[[Row], None], budget: str = "256M", shard_rows: int = 1024,
        epochs: int = 1, folder: Path | None = None, budgets: tuple[str, str] | None = ("64M", "512M"),
        keep: bool = False) -> list[Row]:
    from ..files import require_space

    out: list[Row] = []

    def add(what: str, value: str, note: str = "") -> None:
        out.append((what, value, note))
        log(out[-1])

    base = None
    for k, n in enumerate(sizes):
        if keep:
            cache, done = kept_cache(folder or Path(tempfile.gettempdir()), n, shard_rows)
            tmp = cache.parent
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)  # a killed write's leftovers
                tmp.mkdir(parents=True)
        else:
            tmp, done = Path(tempfile.mkdtemp(prefix="catdog-scale-", dir=folder)), False
            cache = tmp / "features.h5"
        shards = -(-n // shard_rows)
        try:
            if done:
                add(f"scale {n:,} rows: write {shards:,} shards", "kept", f"reused {cache}")
            else:
                require_space(tmp, n * DIM * 2 + 200 * n + 2**30, cache)
                t = time.perf_counter()
                finish_s = synthetic_sharded(cache, n, shard_rows)
                if keep:
                    (tmp / "DONE").write_text("finished\n")
                add(f"scale {n:,} rows: write {shards:,} shards", f"{time.perf_counter() - t:.1f} s",
                    f"finishing (index over every shard) {finish_s:.1f} s")
            r = fit_child(cache, tmp / "h.pt", epochs, budget)
            per_epoch = sum(r["epoch_s"]) / len(r["epoch_s"])
            us = per_epoch / r["n_train"] * 1e6
            base = base or us
            add(f"scale {n:,} rows: open", f"{r['open_s']:.2f} s",
                f"{r['open_s'] / shards * 1e3:.2f} ms/shard; index holds {r['index_rss'] / 2**20:.0f} MiB RSS")
            add(f"scale {n:,} rows: streamed fit, {budget} of chunks", f"{us:.2f} us/row",
                f"{per_epoch:.1f} s/epoch over {r['n_train']:,} training rows ({us / base:.2f}x the first size); "
                f"val acc {r['val_acc']:.3f}; streamed {r['streamed']}")
            growth = (r["peak_rss"] - r["base_rss"]) / 2**20
            add(f"scale {n:,} rows: peak RSS growth", f"{growth:.0f} MiB",
                f"--max-memory {r['max_memory']} ({budget} of chunks + the index and per-row arrays): "
                f"{growth / int(r['max_memory'][:-1]):.2f}x it; index {r['index_rss'] / 2**20:.0f} MiB of RSS, "
                f"{r['base_rss'] / 2**20:.0f} MiB after imports")
            if k == 0 and budgets:
                heads = []
                for b in budgets:
                    heads.append(tmp / f"h-{b}.pt")
                    fit_child(cache, heads[-1], epochs, b)
                add(f"scale {n:,} rows: head with {budgets[0]} vs {budgets[1]} of chunks",
                    "identical" if same_head(*heads) else "DIFFERENT", "state_dict compared bit for bit")
        finally:
            if keep:  # the cache stays; the heads go
                for h in tmp.glob("h*.pt"):
                    h.unlink()
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """python -m catdog_cache.bench.scale 100000,1000000 [budget] [shard_rows] [folder] [keep]"""
    argv = sys.argv[1:] if argv is None else argv
    sizes = [int(x) for x in argv[0].split(",")]
    run(sizes, lambda r: print(f"  {r[0]:<56} {r[1]:>12}  {r[2]}", flush=True), *(argv[1:2] or ["256M"]),
        *([int(argv[2])] if len(argv) > 2 else []), folder=Path(argv[3]) if len(argv) > 3 else None,
        keep=argv[4:5] == ["keep"])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
