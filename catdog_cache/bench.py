"""`catdog-cache bench`: the machine's reference rates, then extract and fit measured against them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

VGG16_GFLOP = 30.9  # forward FLOPs per 224x224 image (15.5 GMAC)
Row = tuple[str, str, str]  # (what, value, note)


def _best(fn: Callable[[], None], repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_gflops(n: int = 3072) -> float:
    """Best of 5: the machine's peak, the reference that extraction is measured against (a shared VM is noisy)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best(lambda: torch.mm(a, b), repeat=5) / 1e9


def copy_gbs(mib: int = 256) -> float:
    src = torch.empty(mib * 2**18, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src)) / 1e9  # read + write


def model_images_per_s(batch: int, device: str = "cpu") -> float:
    from .backbone import WeightsSpec, build

    model = build(WeightsSpec("random")).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode():
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    return batch / _best(step, repeat=2)


def extract_images_per_s(data_dir: Path, limit: int, batch: int) -> tuple[float, int]:
    from .backbone import WeightsSpec
    from .extract import ExtractConfig, extract
    from .verify import balanced_subset

    rels = set(balanced_subset(data_dir, limit))
    with tempfile.TemporaryDirectory() as tmp:
        r = extract(data_dir, Path(tmp) / "f.h5", ExtractConfig(WeightsSpec("random"), batch_size=batch),
                    only=rels)
    return r.extracted / r.seconds, r.extracted


def synthetic_cache(path: Path, rows: int, dtype: str = "float32") -> None:
    from .store import Provenance, Rows, assemble, write_part

    prov = Provenance("synthetic", "fc7", "random:seed=0", "{}", "center", dtype, "fp32")
    rng = np.random.default_rng(0)
    step = 8192
    for s in range(0, rows, step):
        n = min(step, rows - s)
        y = rng.integers(0, 2, n)
        x = np.abs(rng.normal(0, 1, (n, 1, 4096))).astype(np.float32)
        x[:, 0, :64] += y[:, None]
        write_part(path, f"p{s:09d}", prov, "/bench", Rows(features=list(x), paths=[f"{s + i:09d}".encode()
                   for i in range(n)], labels=y.tolist(), sha256=["0" * 64] * n), {}, (1, 4096))
    assemble(path, prov, {})


FIT_CHILD = """
import sys, time
from catdog_cache.fit import FitConfig, fit

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

import torch
t = time.perf_counter()
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch.optim's one-time torch._dynamo import
first_use = time.perf_counter() - t
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) after imports
base = status("VmRSS")
t = time.perf_counter()
r = fit(sys.argv[1], sys.argv[2], FitConfig(epochs=int(sys.argv[3])))
print(time.perf_counter() - t, r.load_seconds, base, status("VmHWM"), first_use)
"""


def fit_run(cache: Path, epochs: int) -> tuple[float, float, float, float]:
    """(wall seconds incl. HDF5 read, load seconds, peak RSS growth in bytes during fit, torch.optim first-use
    seconds) in a fresh process. The first-use import is a fixed cost, measured apart from the data-bound work."""
    head = cache.with_suffix(".pt")
    out = subprocess.run([sys.executable, "-c", FIT_CHILD, str(cache), str(head), str(epochs)], check=True,
                         capture_output=True, text=True).stdout.split()
    wall, load, base, peak, first_use = map(float, out)
    return wall, load, peak - base, first_use


def help_seconds() -> float:
    exe = [sys.executable, "-m", "catdog_cache", "--help"]
    return _best(lambda: subprocess.run(exe, check=True, capture_output=True), repeat=3)


def cache_vs_end_to_end(data_dir: Path, limit: int, log: Callable[[Row], None]) -> list[Row]:
    """Extract + fit for E epochs versus training through the frozen network for E epochs (1 measured,
    5 and 20 extrapolated from it), on the same images, same model, same training loop."""
    from .backbone import WeightsSpec, get_backbone
    from .extract import ExtractConfig, extract
    from .fit import FitConfig, fit, split, train
    from .store import read_index
    from .verify import balanced_subset, network_features

    backbone = get_backbone("vgg16")
    model = backbone.build(WeightsSpec("random"))
    rels = set(balanced_subset(data_dir, limit))
    out: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "f.h5"
        t = time.perf_counter()
        extract(data_dir, cache, ExtractConfig(WeightsSpec("random")), only=rels, model=model)
        t_extract = time.perf_counter() - t
        fit_s = {}
        for e in (1, 5, 20):
            t = time.perf_counter()
            fit(cache, Path(tmp) / "h.pt", FitConfig(epochs=e), curve=False)
            fit_s[e] = time.perf_counter() - t
        index = read_index(cache)
    labels = torch.from_numpy(index.labels.astype(np.int64))
    tr, va = (torch.from_numpy(a) for a in split(index.paths, index.labels, 0.2, 0))
    t = time.perf_counter()
    train(network_features(data_dir, index.paths, model, backbone.preset), labels, tr, va, FitConfig(epochs=1))
    t_e2e = time.perf_counter() - t
    n = len(index.paths)
    for e in (1, 5, 20):
        note = "measured" if e == 1 else f"{e} x the measured epoch"
        row = (f"E={e}, {n} images: end-to-end vs extract + fit",
               f"{e * t_e2e:.1f} s vs {t_extract + fit_s[e]:.1f} s",
               f"speedup {e * t_e2e / (t_extract + fit_s[e]):.1f}x; end-to-end {note}; extract {t_extract:.1f} s "
               f"+ fit {fit_s[e]:.2f} s")
        out.append(row)
        log(row)
    return out


def layouts(cache: Path, log: Callable[[Row], None]) -> list[Row]:
    """The cache layout, justified: full-read time and size for the default and the alternatives."""
    from .store import rewrite_features, time_full_read

    out: list[Row] = []
    for name, dtype, comp, chunk in [("float32, 64-row chunks, uncompressed (default)", "float32", None, 64),
                                     ("float32, 64-row chunks, gzip level 4", "float32", "gzip", 64),
                                     ("float32, 64-row chunks, lzf", "float32", "lzf", 64),
                                     ("float32, 1-row chunks", "float32", None, 1),
                                     ("float16, 64-row chunks (--dtype float16)", "float16", None, 64)]:
        path = cache.with_name(f"layout-{dtype}-{comp}-{chunk}.h5")
        rewrite_features(cache, path, dtype, comp, chunk)
        time_full_read(path)  # warm the page cache: compare decoding, not the disk
        row = (f"layout {name}", f"{min(time_full_read(path) for _ in range(2)):.2f} s read",
               f"{os.path.getsize(path) / 2**20:.0f} MiB")
        out.append(row)
        log(row)
        path.unlink()
    return out


def streaming_epochs(sizes: list[int], log: Callable[[Row], None], budget: str = "64M") -> list[Row]:
    """Seconds per epoch of a streamed fit (a 64 MiB budget, so every size streams) at several cache sizes:
    the growth should be linear."""
    from .fit import FitConfig, fit

    out: list[Row] = []
    base = None
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "s.h5"
            synthetic_cache(cache, n)
            r = fit(cache, Path(tmp) / "h.pt", FitConfig(epochs=2), max_memory=budget, curve=False)
            per_epoch = sum(h.seconds for h in r.history) / len(r.history)
        base = base or per_epoch / n
        row = (f"streamed fit, {n} rows, budget {budget}", f"{per_epoch:.2f} s/epoch",
               f"{per_epoch / n * 1e6:.1f} us/row ({per_epoch / n / base:.2f}x the first size)")
        out.append(row)
        log(row)
    return out


def run(data_dir: Path | None, limit: int, rows: int, log: Callable[[Row], None],
        stream_sizes: list[int] | None = None) -> list[Row]:
    table: list[Row] = []

    def add(what: str, value: str, note: str = "") -> None:
        table.append((what, value, note))
        log((what, value, note))

    gemm, bw = gemm_gflops(), copy_gbs()
    add("fp32 GEMM 3072^3, best of 5", f"{gemm:.1f} GFLOP/s", f"{torch.get_num_threads()} threads")
    add("memory copy 256 MiB", f"{bw:.1f} GB/s", "read + write")
    limit_ips = gemm / VGG16_GFLOP
    add("VGG16 limit from GEMM", f"{limit_ips:.2f} img/s", f"{VGG16_GFLOP} GFLOP per image")
    best_model = 0.0
    for b in (8, 16, 32):
        ips = model_images_per_s(b)
        best_model = max(best_model, ips)
        add(f"VGG16 fc7 forward, batch {b}", f"{ips:.2f} img/s", f"{ips / limit_ips:.2f} of limit")
    if data_dir is not None and data_dir.is_dir():
        ips, n = extract_images_per_s(data_dir, limit, 0)
        add(f"extract end to end, {n} JPEGs", f"{ips:.2f} img/s", f"{ips / limit_ips:.2f} of limit, "
            f"{ips / best_model:.2f} of the model-only forward; decode, HDF5 write, model build included")
        table += cache_vs_end_to_end(data_dir, limit, log)
    else:
        add("extract end to end", "skipped", f"no data folder at {data_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "synthetic.h5"
        t = time.perf_counter()
        synthetic_cache(cache, rows)
        add(f"write synthetic cache {rows} x 4096", f"{time.perf_counter() - t:.2f} s",
            f"{os.path.getsize(cache) / 2**20:.0f} MiB")
        table += layouts(cache, log)
        runs = sorted(fit_run(cache, 20) for _ in range(3))  # fresh processes; a shared VM is noisy
        wall, load, peak, first_use = runs[0]
        matrix = rows * 4096 * 4
        floor = 21 * matrix / (bw * 1e9)  # read once + 20 epochs of row gathers, each touching the matrix
        add(f"fit 20 epochs, {rows} rows (best of 3)", f"{wall:.2f} s", f"median {runs[1][0]:.2f} s; load "
            f"{load:.2f} s; memory floor {floor:.2f} s")
        add("torch.optim first use (once per process)", f"{first_use:.2f} s", "imports torch._dynamo; not in fit")
        add("fit peak memory", f"{peak / 2**20:.0f} MiB", f"{peak / matrix:.2f}x the feature matrix")
    if stream_sizes:
        table += streaming_epochs(stream_sizes, log)
    add("catdog-cache --help", f"{help_seconds():.2f} s", "python -m catdog_cache --help")
    return table
