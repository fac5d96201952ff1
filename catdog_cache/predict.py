"""New folder -> the head's own backbone and preprocessing -> probabilities -> CSV rows (and a Kaggle submission).

The scorer (frozen backbone + storage-dtype rounding + head + temperature) is one module: `predict` runs it, and
`export` saves it as a self-contained TorchScript file that `predict --model` and plain PyTorch can run."""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backbone import WeightsSpec, build, spec_from_identity
from .discover import discover
from .errors import CacheError, InputError
from .extract import ExtractConfig, Progress, run_features
from .head import Head, load_head
from .preprocess import decoder_of
from .store import Provenance, require_same


class Scorer(nn.Module):
    """[B, 3, 224, 224] normalised images -> [B, 2] calibrated probabilities (cat, dog)."""

    def __init__(self, backbone: nn.Module, head: Head, dtype: str, temperature: float) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.half = dtype == "float16"
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x).float()  # [B, 4096]
        if self.half:
            f = f.half().float()  # the head must see exactly what the cache stored
        return (self.head.linear(f) / self.temperature).softmax(1)  # [B, 2]


@dataclass
class Loaded:
    scorer: nn.Module
    provenance: Provenance
    clip: float
    meta: dict[str, Any]
    spec: WeightsSpec  # the weights identity the scorer was built from

    def config(self, device: str = "auto", batch_size: int = 0, workers: int = -1,
               views: tuple[str, ...] | None = None) -> ExtractConfig:
        """The extraction settings the scorer expects (views: the head's, unless narrowed)."""
        prov = self.provenance
        return ExtractConfig(weights=self.spec, arch=prov.arch, device=device, batch_size=batch_size, workers=workers,
                             dtype=prov.dtype, precision=prov.precision, views=views or tuple(prov.views.split(",")),
                             decoder=decoder_of(prov.transform))


def load_scorer(head_path: str | os.PathLike[str], weights_file: str | None = None) -> Loaded:
    head, meta = load_head(head_path)
    prov = Provenance.from_json(meta["provenance"])
    spec = spec_from_identity(prov.weights, weights_file)
    scorer = Scorer(build(spec, prov.arch), head, prov.dtype, float(meta.get("temperature", 1.0))).eval()
    loaded = Loaded(scorer, prov, float(meta.get("clip", 0.0)), meta, spec)
    require_same(prov, loaded.config().provenance(), f"head {head_path}", "this catdog-cache")  # a changed transform
    return loaded


EXPORT_FORMAT = 1


def export(head_path: str | os.PathLike[str], out: str | os.PathLike[str], weights_file: str | None = None) -> Path:
    """One file: the scorer as a torch.export program, with its provenance, temperature and clip as an extra file.
    Plain PyTorch runs it: `torch.export.load(path).module()(x)`, x: [B, 3, 224, 224] after the recorded transform,
    output [B, 2] probabilities (cat, dog)."""
    loaded = load_scorer(head_path, weights_file)
    example = (torch.zeros(2, 3, 224, 224),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(loaded.scorer, example, dynamic_shapes={"x": {0: batch}})
    extra = {"catdog_cache.json": json.dumps({"format": EXPORT_FORMAT, "provenance": json.loads(
        loaded.provenance.to_json()), "clip": loaded.clip, "temperature": loaded.scorer.temperature,
        "classes": ["cat", "dog"]})}
    out = Path(out)
    if out.suffix != ".pt2":
        raise InputError(f"--out {out}: torch.export archives are named *.pt2")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.pt2")
    torch.export.save(program, tmp, extra_files=extra)
    os.replace(tmp, out)
    return out


def load_exported(path: str | os.PathLike[str]) -> Loaded:
    if not Path(path).is_file():
        raise InputError(f"--model {path}: no such file (make one with `catdog-cache export`)")
    if Path(path).suffix != ".pt2":
        raise InputError(f"--model {path}: expected a *.pt2 file from `catdog-cache export`")
    extra = {"catdog_cache.json": ""}
    try:
        module = torch.export.load(path, extra_files=extra).module()
        info = json.loads(extra["catdog_cache.json"])
    except Exception as e:
        raise CacheError(f"{path} is not a model exported by `catdog-cache export` ({type(e).__name__})") from None
    prov = Provenance(**info["provenance"])
    return Loaded(module, prov, float(info["clip"]), info, spec_from_identity(prov.weights, need_file=False))


@dataclass
class PredictReport:
    out: Path
    rows: list[tuple[str, float, float, str]]  # (relative path, p_cat, p_dog, label)
    labels: list[int]  # -1 where the folder does not say
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    submission: Path | None = None
    seconds: float = 0.0
    views: tuple[str, ...] = ("center",)

    @property
    def accuracy(self) -> float | None:
        known = [(r[3], y) for r, y in zip(self.rows, self.labels, strict=True) if y >= 0]
        return sum(lab == ("cat", "dog")[y] for lab, y in known) / len(known) if known else None


def write_csv_atomic(path: Path, header: list[str], rows: list[tuple]) -> None:
    """Temp file + rename. surrogateescape: a non-UTF-8 file name is written back as its original bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def predict(data_dir: str | os.PathLike[str], head_path: str | os.PathLike[str] | None, out: str | os.PathLike[str],
            submission: str | os.PathLike[str] | None = None, weights_file: str | None = None,
            device: str = "auto", batch_size: int = 0, workers: int = -1, progress: Progress | None = None,
            tta: bool = False, model_path: str | os.PathLike[str] | None = None) -> PredictReport:
    t0 = time.perf_counter()
    loaded = load_exported(model_path) if model_path else load_scorer(head_path or "cache/head.pt", weights_file)
    prov = loaded.provenance
    head_views = tuple(prov.views.split(","))
    if tta and len(head_views) < 2:
        raise InputError(f"--tta: the head's features have one view ({prov.views}); extract with "
                         "--views center,flip and fit again to use test-time augmentation")
    cfg = loaded.config(device, batch_size, workers, views=None if tta else ("center",))
    require_same(prov, replace(cfg.provenance(), views=prov.views), "the model", "this catdog-cache")
    disc = discover(data_dir)
    if not disc.samples:
        raise InputError(f"no images found in {data_dir}")
    rels = [s.rel for s in disc.samples]
    probs: dict[int, np.ndarray] = {}
    failed: list[tuple[str, str]] = []
    for idx, p, _, failures in run_features(disc.root, rels, cfg, model=loaded.scorer, progress=progress):
        mean = p.mean(axis=1)  # [B, 2]: the average over views (one view without --tta)
        for j, i in enumerate(idx):
            probs[i] = mean[j]
        failed += [(rels[i], reason) for i, _, reason in failures]
    rows = [(rels[i], float(probs[i][0]), float(probs[i][1]), "dog" if probs[i][1] > probs[i][0] else "cat")
            for i in sorted(probs)]
    labels = [disc.samples[i].label for i in sorted(probs)]
    out = Path(out)
    if submission:
        submission = Path(submission)
        write_submission(submission, rows, loaded.clip)
    write_csv_atomic(out, ["path", "p_cat", "p_dog", "label"], rows)
    return PredictReport(out, rows, labels, failed, disc.skipped, submission, time.perf_counter() - t0,
                         cfg.views)


def write_submission(path: Path, rows: list[tuple[str, float, float, str]], clip: float = 0.0) -> None:
    """Kaggle Redux format: `id,label` with label = P(dog) clipped to [clip, 1 - clip] (chosen on validation by
    `fit --calibrate`), id from the numeric file name, sorted by id."""
    ids = []
    for rel, _, p_dog, _ in rows:
        stem = Path(rel).name.split(".")[0]
        if not stem.isdigit():
            raise InputError(f"--submission needs numeric file names like 123.jpg; {rel!r} is not")
        ids.append((int(stem), min(max(p_dog, clip), 1 - clip)))
    write_csv_atomic(path, ["id", "label"], [(i, f"{p:.6f}") for i, p in sorted(ids)])


@dataclass
class PreviewReport:
    out: Path
    shown: int
    wrong: int | None  # None when the folder has no labels


def preview(data_dir: str | os.PathLike[str], head_path: str | os.PathLike[str], out: str | os.PathLike[str],
            n: int = 16, weights_file: str | None = None, device: str = "auto") -> PreviewReport:
    """A grid of n images spread over the folder, with the predicted label and probability; wrong ones in red.
    Images are shown as the model saw them (resize 256, center crop 224), without the normalisation."""
    from torchvision.transforms.v2 import functional as TF

    from .plots import prediction_grid
    from .preprocess import CROP, RESIZE, DecodeError, decode_rgb

    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    loaded = load_scorer(head_path, weights_file)
    disc = discover(data_dir)
    if not disc.samples:
        raise InputError(f"no images found in {data_dir}")
    picks = sorted({int(i) for i in np.linspace(0, len(disc.samples) - 1, min(n, len(disc.samples)))})
    samples = [disc.samples[i] for i in picks]
    cfg = loaded.config(device, views=("center",))
    rels = [s.rel for s in samples]
    probs: dict[int, np.ndarray] = {}
    for idx, p, _, _ in run_features(disc.root, rels, cfg, model=loaded.scorer):
        for j, i in enumerate(idx):
            probs[i] = p[j, 0]
    images, captions, wrong = [], [], []
    for i in sorted(probs):
        try:
            img = decode_rgb((disc.root / rels[i]).read_bytes())
        except (OSError, DecodeError):
            continue
        images.append(TF.pil_to_tensor(TF.center_crop(TF.resize(img, RESIZE), CROP)))  # [3, 224, 224] uint8
        pred = int(probs[i][1] > probs[i][0])
        truth = samples[i].label
        wrong.append(None if truth < 0 else pred != truth)
        mark = "" if truth < 0 else (" WRONG" if pred != truth else " ok")
        captions.append(f"{('cat', 'dog')[pred]} {probs[i][pred]:.2f}{mark}  {Path(rels[i]).name[:18]}")
    if not images:
        raise InputError(f"none of the images picked from {data_dir} could be decoded")
    path = prediction_grid(images, captions, wrong, out)
    known = [w for w in wrong if w is not None]
    return PreviewReport(path, len(images), sum(known) if known else None)
