"""`catdog-cache bench` extract-pipeline rows: extract against a plain DataLoader loop feeding the same network,
same files, same workers and batch size, each in a fresh process; throughput and the main process's own CPU.
On a GPU (or with --table), the machine's table: extract per backbone, decoder and precision against the plain
loop, the decode-only ceilings (Pillow in workers; the device decoder) and the model-only ceilings."""

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
from typing import Any

Row = tuple[str, str, str]  # (what, value, note)


def _own_cpu() -> float:
    """CPU seconds of this process (all its threads), without its children: DataLoader workers are not counted."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


Tick = Callable[[int], None]  # called with the images done so far, after each batch


def plain_loop(data_dir: Path, backbone: str, workers: int, batch: int, device: str, precision: str = "fp32",
               tick: Tick | None = None) -> int:
    """The loop a user would write: Pillow decode + the preset in workers, forward, features to the host."""
    import torch
    from PIL import Image

    from ..backbone import WeightsSpec, get_backbone
    from ..sources.folder import discover

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
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                                enabled=precision == "bf16"):
        for x in loader:  # [B, 3, 224, 224]
            model(x.to(device, non_blocking=True)).float().cpu()  # [B, D]
            n += len(x)
            if tick:
                tick(n)
    return n


def extract_run(data_dir: Path, backbone: str, workers: int, batch: int, device: str, precision: str = "fp32",
                tick: Tick | None = None, decoder: str = "pil") -> int:
    from ..backbone import WeightsSpec
    from ..engines.dispatch import extract
    from ..extract.config import ExtractConfig

    with tempfile.TemporaryDirectory() as tmp:
        r = extract(data_dir, Path(tmp) / "f.h5", ExtractConfig(
            WeightsSpec("random"), backbone=backbone, device=device, workers=workers, batch_size=batch,
            precision=precision, decoder=decoder),
            progress=(lambda stage, done, _: tick(done) if stage == "extract" else None) if tick else None)
    return r.extracted


def decode_run(data_dir: Path, backbone: str, workers: int, batch: int, device: str, decoder: str = "pil",
               tick: Tick | None = None) -> int:
    """The decode-only ceiling: extract's loader (decoder "pil": Pillow + the preset in the workers; "torchvision":
    workers read bytes, the batch is decoded and preprocessed on the device), no model."""
    import torch

    from ..backbone import get_backbone
    from ..extract.loader import Encoded, ImageFiles, collate, device_batch, worker_init
    from ..sources.folder import discover

    preset, disc, dev = get_backbone(backbone).preset, discover(data_dir), torch.device(device)
    loader = torch.utils.data.DataLoader(
        ImageFiles(disc.root, [s.rel for s in disc.samples], ("center",), preset, decoder), batch_size=batch,
        num_workers=workers, collate_fn=collate, pin_memory=dev.type == "cuda",
        worker_init_fn=worker_init if workers else None, prefetch_factor=4 if workers else None)
    n = 0
    for x, idx, shas, _ in loader:
        if isinstance(x, Encoded):
            x, idx, _, _ = device_batch(x, idx, shas, ("center",), dev, preset)  # [B, 1, 3, S, S] on the device
        n += len(idx)
        if tick and n < len(disc.samples):
            tick(n)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # the last batches' kernels are done before the clock stops
    if tick:
        tick(n)
    return n


def model_run(backbone: str, batch: int, device: str, precision: str = "fp32", tick: Tick | None = None,
              steps: int = 20) -> int:
    """The model-only ceiling: preprocessed batches already on the device, channels-last, as extract runs them."""
    import torch

    from ..backbone import WeightsSpec, get_backbone

    bb = get_backbone(backbone)
    model = bb.build(WeightsSpec("random")).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, bb.preset.crop, bb.preset.crop, device=device).contiguous(
        memory_format=torch.channels_last)  # [B, 3, S, S]
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
    n = 0
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                                enabled=precision == "bf16"):
        for step in range(steps + 2):  # 2 warm-up steps: the first tick starts the clock after them
            model(x)
            if cuda:
                torch.cuda.synchronize()
            n += batch
            if tick and step >= 1:
                tick(n)
    return n


MODES: dict[str, Callable[..., int]] = {"extract": extract_run, "loop": plain_loop, "decode": decode_run,
                                        "model": model_run}


def run_mode(spec: dict[str, Any]) -> dict[str, float]:
    """One measured run: {"wall": seconds, "cpu": own CPU seconds, "n": images, "steady": img/s over the second
    half of the images}. The second half: start-up, worker spawn and the first batch's autotuning are excluded, and
    so are the batches the workers decoded ahead meanwhile (up to prefetch x workers batches), which the first
    half consumes at model speed; the wall rate if there are too few batches to tell."""
    ticks: list[tuple[float, int]] = []
    args = {k: v for k, v in spec.items() if k != "mode"}
    if "data_dir" in args:
        args["data_dir"] = Path(args["data_dir"])
    c, t = _own_cpu(), time.perf_counter()
    n = MODES[spec["mode"]](**args, tick=lambda done: ticks.append((time.perf_counter(), done)))
    wall = time.perf_counter() - t
    half = next((t for t in ticks if t[1] >= ticks[-1][1] / 2), ticks[0]) if ticks else None
    if half is not None and half[1] == ticks[-1][1]:
        half = ticks[0]  # the last batch holds the second half: from the first batch
    steady = ((ticks[-1][1] - half[1]) / (ticks[-1][0] - half[0]) if half is not None and ticks[-1][0] > half[0]
              else n / wall)
    return {"wall": wall, "cpu": _own_cpu() - c, "n": n, "steady": steady}


def child(argv: list[str]) -> None:
    """In a fresh process: one run (a JSON spec), printed as JSON (wall seconds, own CPU seconds, images, steady
    img/s)."""
    import torch  # noqa: F401  imports before the clock starts: all modes pay them alike
    import torchvision  # noqa: F401

    from ..engines import dispatch  # noqa: F401  (the extract path's own imports, also before the clock)

    print(json.dumps(run_mode(json.loads(argv[0]))))


def measure_run(spec: dict[str, Any], fresh: bool = True, env: dict[str, str] | None = None) -> dict[str, float]:
    """run_mode in a fresh process (fresh=False: in this one, for tests)."""
    if not fresh:
        return run_mode(spec)
    return in_fresh_process("import sys; from catdog_cache.bench.pipeline import child; child(sys.argv[1:])", spec,
                            env)


def in_fresh_process(code: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `code` in a fresh Python with the JSON spec as its argument; its last stdout line, parsed as JSON. A
    failure is its last line of output, raised."""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(mode: str, data_dir: Path, backbone: str, workers: int, batch: int, device: str = "cpu",
            env: dict[str, str] | None = None) -> tuple[float, float]:
    """(images per second, main-process CPU microseconds per image) of one fresh-process run."""
    r = measure_run({"mode": mode, "data_dir": str(data_dir), "backbone": backbone, "workers": workers,
                     "batch": batch, "device": device}, env=env)
    return r["n"] / r["wall"], r["cpu"] / r["n"] * 1e6


DISTINCT = 256  # drawn photos; beyond these, copies under new names (a GPU table wants 20,000 files, not 10 min)


def photo_like(root: Path, n: int, seed: int = 0) -> Path:
    """n drawn cat/dog faces as 500x375 JPEGs with sensor-like noise (a flat drawing decodes faster than a photo),
    so the pipeline rows run anywhere; --data gives real photos instead. The first DISTINCT are drawn, the rest
    are their bytes again (every file is still read, hashed and decoded)."""
    import random

    import numpy as np
    from PIL import Image

    from ..demo import draw_animal

    rng, noise = random.Random(seed), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = "cat" if i % 2 == 0 else "dog"
        if i >= DISTINCT:
            (root / f"{kind}.{i // 2}.jpg").write_bytes((root / f"{kind}.{i % DISTINCT // 2}.jpg").read_bytes())
            continue
        im = np.asarray(draw_animal(kind, rng, size=375).resize((500, 375)), np.int16)  # [375, 500, 3]
        im = np.clip(im + noise.integers(-12, 13, im.shape), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(root / f"{kind}.{i // 2}.jpg", quality=90)
    return root


def extract_vs_loop(data_dir: Path, workers: int, batch: int, log: Callable[[Row], None], device: str = "cpu",
                    backbone: str = "tiny", repeats: int = 3) -> list[Row]:
    """Interleaved A/B runs (a shared machine drifts), medians reported. The device is an option so that GPU rows
    (batch 128, pinned memory) come from the same code. workers -1 and batch 0: extract's defaults."""
    from ..extract.loader import default_workers
    from ..sources.folder import discover

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


def _median(runs: list[dict[str, float]]) -> float:
    return statistics.median(r["steady"] for r in runs)


def device_table(data_dir: Path, log: Callable[[Row], None], device: str = "cuda", backbones: list[str] | None = None,
                 workers: int = -1, batch: int = 0, model_batch: int = 0, repeats: int = 1, fresh: bool = True
                 ) -> list[Row]:
    """The machine's extract table: extract per backbone x decoder (pil, torchvision) x precision (fp32, bf16);
    the plain DataLoader loop (same preset, batch, workers = cores, pin_memory; fp32 and bf16 autocast); the
    decode-only ceilings (Pillow + the preset in workers = cores; the device decoder with byte-reading workers),
    and the model-only ceilings (preprocessed batches of `model_batch` already on the device). Rates are steady
    state, over the second half of the files (run_mode: use enough files that the workers' read-ahead is under
    half of them, e.g. 20,000 on 16 cores), medians of `repeats` interleaved fresh-process runs. Ratios: extract
    / the plain loop of the same backbone and precision, and extract / min(its decoder's decode ceiling, its
    model ceiling)."""
    from ..extract.loader import cores
    from ..sources.folder import discover

    backbones = backbones or ["vgg16", "efficientnet_lite0"]
    n = len(discover(data_dir).samples)
    every = workers if workers >= 0 else cores()  # the ceilings and the plain loop: all cores decode
    batch = batch or (128 if device.startswith("cuda") else 16)
    model_batch = model_batch or (256 if device.startswith("cuda") else batch)
    base = {"data_dir": str(data_dir), "device": device, "batch": batch}
    specs: dict[str, dict[str, Any]] = {}
    for decoder in ("pil", "torchvision"):
        specs[f"decode {decoder}"] = {**base, "mode": "decode", "backbone": backbones[0], "workers": every,
                                      "decoder": decoder}
    for bb in backbones:
        for precision in ("fp32", "bf16"):
            specs[f"model {bb} {precision}"] = {"mode": "model", "backbone": bb, "batch": model_batch,
                                                "device": device, "precision": precision}
            specs[f"loop {bb} {precision}"] = {**base, "mode": "loop", "backbone": bb, "workers": every,
                                               "precision": precision}
            for decoder in ("pil", "torchvision"):
                specs[f"extract {bb} {decoder} {precision}"] = {**base, "mode": "extract", "backbone": bb,
                                                                "workers": workers, "precision": precision,
                                                                "decoder": decoder}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in specs}
    failed: dict[str, str] = {}
    for _ in range(repeats):  # interleaved: a drifting machine spreads over every row alike
        for key, spec in specs.items():
            if key not in failed:
                try:
                    runs[key].append(measure_run(spec, fresh))
                except Exception as e:  # e.g. a backbone whose extra is not installed: its rows say so
                    failed[key] = f"{type(e).__name__}: {e}".splitlines()[0][:160]
    rate = {k: _median(r) for k, r in runs.items() if r}
    rows: list[Row] = []

    def add(key: str, what: str, note: str) -> None:
        row = (what, f"{rate[key]:,.0f} img/s", note) if key in rate else (what, "failed", failed.get(key, ""))
        rows.append(row)
        log(row)

    setting = f"{device}, {n} files, median of {repeats}, steady state (second half of the files)"
    add("decode pil", f"decode ceiling: Pillow + preset, {every} workers", f"no model; batch {batch}; {setting}")
    add("decode torchvision", f"decode ceiling: torchvision on {device}", f"workers ({every}) read bytes; batched "
        "decode_jpeg + resize/crop/normalise on the device; no model")
    for bb in backbones:
        for precision in ("fp32", "bf16"):
            add(f"model {bb} {precision}", f"model ceiling: {bb} {precision}", f"batch {model_batch} on the device")
        for precision in ("fp32", "bf16"):
            loop = f"loop {bb} {precision}"
            add(loop, f"plain DataLoader loop: {bb} {precision}", f"batch {batch}, {every} workers, pin_memory"
                + (", bf16 autocast" if precision == "bf16" else ""))
            for decoder in ("pil", "torchvision"):
                key, ceilings = f"extract {bb} {decoder} {precision}", [f"decode {decoder}", f"model {bb} {precision}"]
                note = ""
                if key in rate:
                    parts = [f"{rate[key] / rate[loop]:.2f}x the plain loop" if loop in rate else ""]
                    if all(c in rate for c in ceilings):
                        bound = min(rate[c] for c in ceilings)
                        parts.append(f"{rate[key] / bound:.2f} of min(decode {rate[ceilings[0]]:,.0f}, model "
                                     f"{rate[ceilings[1]]:,.0f})")
                    note = "; ".join(p for p in parts if p)
                add(key, f"extract: {bb} {precision} --decoder {decoder}", note)
    return rows


def table(data_dir: Path | None, n: int, log: Callable[[Row], None], device: str, backbones: list[str] | None,
          workers: int, batch: int, repeats: int) -> list[Row]:
    """device_table on `data_dir`, or on n photo-like drawn 500x375 JPEGs when it is None."""
    if data_dir is not None:
        return device_table(data_dir, log, device, backbones, workers, batch, repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        return device_table(photo_like(Path(tmp) / "photos", n), log, device, backbones, workers, batch,
                            repeats=repeats)
