"""`catdog-cache bench --only bound`: the CPU pipeline against its work bound. Per backbone and precision, measured
alone in the same run, each in a fresh process: decoding's core-ms per image (Pillow + the preset on one thread)
and the forward's (the cheapest of threads x wall-ms per image over thread counts and images per call); the bound
is every core busy with one or the other, cores / (decode + forward) images per second; extract's steady rate over
it is the ratio. Repeats are interleaved (a shared machine drifts) and medians reported."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, str, str]  # (what, value, note)


def decode_cost(data_dir: str, backbone: str, n: int = 64) -> dict[str, float]:
    """Decode + preset core-ms per image on one thread, in this process: extract's own decode (ImageFiles)."""
    import torch

    from ..backbone import get_backbone
    from ..extract.heap import keep_freed_memory
    from ..extract.loader import ImageFiles
    from ..sources.folder import discover

    keep_freed_memory()  # as extract's workers run
    torch.set_num_threads(1)
    disc = discover(data_dir)
    files = ImageFiles(disc.root, [s.rel for s in disc.samples[:n]], ("center",), get_backbone(backbone).preset)
    files[0]  # first-call set-up (imports, tables) is not a per-image cost
    t = time.thread_time()
    for i in range(len(files)):
        files[i]
    return {"decode_ms": (time.thread_time() - t) / len(files) * 1e3}


def forward_cost(backbone: str, precision: str, batch: int = 16, steps: int = 2) -> dict[str, Any]:
    """The forward alone on preprocessed channels-last batches: wall-ms per image at each thread count the pacer
    tries (all cores, halving to 1) and each chunk (the batch, halving to 4); core-ms = threads x wall-ms."""
    import torch

    from ..backbone import WeightsSpec, get_backbone
    from ..extract.heap import keep_freed_memory
    from ..extract.loader import cores
    from ..extract.pacing import chunk_sizes, thread_counts

    keep_freed_memory()  # as extract runs it: the cheapest forward this process can do
    bb = get_backbone(backbone)
    model = bb.build(WeightsSpec("random")).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, bb.preset.crop, bb.preset.crop).contiguous(memory_format=torch.channels_last)
    walls: dict[str, float] = {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for chunk in chunk_sizes(batch):
            for t in thread_counts(cores()):
                torch.set_num_threads(t)
                model(x[:chunk])  # per-shape set-up
                best, spent = float("inf"), time.perf_counter()
                for i in range(max(steps, 8)):
                    if i >= steps and time.perf_counter() - spent > 3.0:  # more steps while they are quick
                        break
                    s = time.perf_counter()
                    for j in range(0, batch, chunk):
                        model(x[j:j + chunk])
                    best = min(best, (time.perf_counter() - s) / batch * 1e3)
                walls[f"{t}x{chunk}"] = best
    core = {k: int(k.split("x")[0]) * v for k, v in walls.items()}
    cheapest = min(core, key=lambda k: core[k])
    return {"wall_ms": walls, "core_ms": core[cheapest], "setting": cheapest}


def extract_cost(data_dir: str, backbone: str, precision: str) -> dict[str, Any]:
    """extract with its defaults on the folder: its steady rate (second half of the files), its whole-run rate
    (planning, model build and worker start included) and what its pacer chose."""
    from ..extract import forward
    from ..extract.pacing import describe
    from .pipeline import run_mode

    r = run_mode({"mode": "extract", "data_dir": data_dir, "backbone": backbone, "workers": -1, "batch": 0,
                  "device": "cpu", "precision": precision})
    return {**r, "pacer": describe(forward.last_pacer[0]) if forward.last_pacer else {}}


MEASURES: dict[str, Callable[..., dict[str, Any]]] = {"decode": decode_cost, "forward": forward_cost,
                                                      "extract": extract_cost}


def child(spec: str) -> None:
    import torch  # noqa: F401  imports before any clock: every measurement pays them alike

    args = json.loads(spec)
    print(json.dumps(MEASURES[args.pop("what")](**args)))


def measure(spec: dict[str, Any], fresh: bool = True) -> dict[str, Any]:
    if not fresh:
        args = dict(spec)
        return MEASURES[args.pop("what")](**args)
    from .pipeline import in_fresh_process

    return in_fresh_process("import sys; from catdog_cache.bench.bound import child; child(sys.argv[1])", spec)


def bound_rows(data_dir: Path, log: Callable[[Row], None], backbones: list[str], precisions: list[str],
               repeats: int = 3, fresh: bool = True) -> list[Row]:
    """One row per backbone and precision: extract's steady rate against cores / (decode + forward core-ms), all
    measured in this run, interleaved; then whether this CPU computes bf16 natively."""
    from ..extract.loader import cores
    from ..extract.precision import cpu_bf16
    from ..sources.folder import discover

    n, ncores = len(discover(data_dir).samples), cores()
    specs: dict[str, dict[str, Any]] = {}
    for bb in backbones:
        specs[f"decode {bb}"] = {"what": "decode", "data_dir": str(data_dir), "backbone": bb}
        for p in precisions:
            specs[f"forward {bb} {p}"] = {"what": "forward", "backbone": bb, "precision": p}
            specs[f"extract {bb} {p}"] = {"what": "extract", "data_dir": str(data_dir), "backbone": bb,
                                          "precision": p}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in specs}
    loads: list[float] = []
    for _ in range(repeats):
        for key, spec in specs.items():
            runs[key].append(measure(spec, fresh))
            loads.append(os.getloadavg()[0])
    rows: list[Row] = []
    for bb in backbones:
        d = statistics.median(r["decode_ms"] for r in runs[f"decode {bb}"])
        for p in precisions:
            fw = runs[f"forward {bb} {p}"]
            f = statistics.median(r["core_ms"] for r in fw)
            ex = runs[f"extract {bb} {p}"]
            steady = statistics.median(r["steady"] for r in ex)
            whole = statistics.median(r["n"] / r["wall"] for r in ex)
            limit = 1e3 * ncores / (d + f)
            chose = ex[-1]["pacer"]
            row = (f"{bb} {p}: extract vs the work bound", f"{steady:.1f} of {limit:.1f} img/s",
                   f"{steady / limit:.2f} of the bound; decode {d:.1f} + forward {f:.1f} core-ms/img (cheapest "
                   f"{fw[-1]['setting']} threads x images), {ncores} cores; whole run {whole:.1f} img/s; extract "
                   f"chose {chose.get('setting')} (threads x images); {n} files, median of {repeats}")
            rows.append(row)
            log(row)
    kind = cpu_bf16()
    row = ("bf16 on this CPU", "native" if kind else "emulated",
           f"{kind} (from the CPU flags)" if kind else "no AVX512-BF16 or AMX flag: bf16 autocast runs in software")
    rows.append(row)
    log(row)
    load = ("load average during the run", f"{statistics.median(loads):.1f}",
            f"min {min(loads):.1f}, max {max(loads):.1f}, sampled after each measurement")
    rows.append(load)
    log(load)
    return rows


def run(data_dir: Path | None, n: int, log: Callable[[Row], None], backbones: list[str] | None,
        precisions: list[str] | None = None, repeats: int = 3) -> list[Row]:
    """bound_rows on `data_dir`, or on n photo-like drawn 500x375 JPEGs when it is None."""
    from .pipeline import photo_like

    backbones = backbones or ["vgg16", "resnet18", "efficientnet_lite0"]
    precisions = precisions or ["fp32", "bf16"]
    if data_dir is not None:
        return bound_rows(data_dir, log, backbones, precisions, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        return bound_rows(photo_like(Path(tmp) / "photos", n), log, backbones, precisions, repeats)
