"""`catdog-cache bench` extract-pipeline rows: extract against a plain DataLoader loop feeding the same network,
same files, same workers and batch size, each in a fresh process; throughput and the main process's own CPU."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

Row = tuple[str, str, str]  # (what, value, note)


def _own_cpu() -> float:
    """CPU seconds of this process (all its threads), without its children: DataLoader workers are not counted."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plain_loop(data_dir: Path, backbone: str, workers: int, batch: int, device: str) -> int:
    """The loop a user would write: Pillow decode + the preset in workers, forward, features to the host."""
    import torch
    from PIL import Image

    from .backbone import WeightsSpec, get_backbone
    from .discover import discover

    bb = get_backbone(backbone)
    transform = bb.preset.transform()
    disc = discover(data_dir)  # the files extract takes
    paths = [disc.root / s.rel for s in disc.samples]

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            with Image.open(paths[i]) as im:
                return transform(im.convert("RGB"))  # [3, 224, 224]

    cuda = device.startswith("cuda")
    model = bb.build(WeightsSpec("random")).to(device)
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=workers, pin_memory=cuda)
    n = 0
    with torch.inference_mode():
        for x in loader:  # [B, 3, 224, 224]
            model(x.to(device, non_blocking=True)).float().cpu()  # [B, D]
            n += len(x)
    return n


def extract_run(data_dir: Path, backbone: str, workers: int, batch: int, device: str) -> int:
    from .backbone import WeightsSpec
    from .extract import ExtractConfig, extract

    with tempfile.TemporaryDirectory() as tmp:
        r = extract(data_dir, Path(tmp) / "f.h5", ExtractConfig(WeightsSpec("random"), backbone=backbone,
                                                                 device=device, workers=workers, batch_size=batch))
    return r.extracted


def child(argv: list[str]) -> None:
    """In a fresh process: one run of `mode`, printed as JSON (wall seconds, own CPU seconds, images)."""
    mode, data, backbone, workers, batch, device = argv
    import torch  # noqa: F401  imports before the clock starts: both modes pay them alike
    import torchvision  # noqa: F401

    from . import extract as _  # noqa: F401

    fn = {"extract": extract_run, "loop": plain_loop}[mode]
    c, t = _own_cpu(), time.perf_counter()
    n = fn(Path(data), backbone, int(workers), int(batch), device)
    print(json.dumps({"wall": time.perf_counter() - t, "cpu": _own_cpu() - c, "n": n}))


def measure(mode: str, data_dir: Path, backbone: str, workers: int, batch: int, device: str = "cpu",
            env: dict[str, str] | None = None) -> tuple[float, float]:
    """(images per second, main-process CPU microseconds per image) of one fresh-process run."""
    code = "import sys; from catdog_cache.benchpipe import child; child(sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, mode, str(data_dir), backbone, str(workers), str(batch),
                          device], check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["n"] / r["wall"], r["cpu"] / r["n"] * 1e6


def photo_like(root: Path, n: int, seed: int = 0) -> Path:
    """n drawn cat/dog faces as 500x375 JPEGs with sensor-like noise (a flat drawing decodes faster than a photo),
    so the pipeline rows run anywhere; --data gives real photos instead."""
    import random

    import numpy as np
    from PIL import Image

    from .demo import draw_animal

    rng, noise = random.Random(seed), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = "cat" if i % 2 == 0 else "dog"
        im = np.asarray(draw_animal(kind, rng, size=375).resize((500, 375)), np.int16)  # [375, 500, 3]
        im = np.clip(im + noise.integers(-12, 13, im.shape), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(root / f"{kind}.{i // 2}.jpg", quality=90)
    return root


def extract_vs_loop(data_dir: Path, workers: int, batch: int, log: Callable[[Row], None], device: str = "cpu",
                    backbone: str = "tiny", repeats: int = 3) -> list[Row]:
    """Interleaved A/B runs (a shared machine drifts), medians reported. The device is an option so that GPU rows
    (batch 128, pinned memory) come from the same code. workers -1 and batch 0: extract's defaults."""
    from .discover import discover
    from .pipeline import default_workers

    n = len(discover(data_dir).samples)
    workers = workers if workers >= 0 else default_workers(n)
    batch = batch or (128 if device.startswith("cuda") else 16)
    runs: dict[str, list[tuple[float, float]]] = {"extract": [], "loop": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(measure(mode, data_dir, backbone, workers, batch, device))
    ips = {m: statistics.median(r[0] for r in rs) for m, rs in runs.items()}
    cpu = {m: statistics.median(r[1] for r in rs) for m, rs in runs.items()}
    setting = f"{backbone}, {device}, {workers} workers, batch {batch}, {n} files"
    rows: list[Row] = [
        (f"extract vs plain DataLoader loop ({setting})", f"{ips['extract']:.0f} vs {ips['loop']:.0f} img/s",
         f"{ips['extract'] / ips['loop']:.2f}x; median of {repeats}, interleaved, fresh processes"),
        ("  main-process CPU per image, extract vs loop", f"{cpu['extract']:.0f} vs {cpu['loop']:.0f} us",
         f"{cpu['extract'] / cpu['loop']:.2f}x; the process's own threads, decode workers excluded"),
    ]
    for row in rows:
        log(row)
    return rows


def run(data_dir: Path | None, n: int, workers: int, batch: int, device: str, log: Callable[[Row], None],
        repeats: int = 3) -> list[Row]:
    """The pipeline rows on `data_dir` (a folder of JPEGs), or on n photo-like drawn JPEGs when it is None."""
    if data_dir is not None:
        return extract_vs_loop(data_dir, workers, batch, log, device, repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        return extract_vs_loop(photo_like(Path(tmp) / "photos", n), workers, batch, log, device, repeats=repeats)
