"""New folder -> the head's own backbone and preprocessing -> features -> head -> CSV rows (and a Kaggle submission)."""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbone import spec_from_identity
from .discover import discover
from .errors import InputError
from .extract import ExtractConfig, Progress, run_features
from .head import load_head
from .store import Provenance, require_same


@dataclass
class PredictReport:
    out: Path
    rows: list[tuple[str, float, float, str]]  # (relative path, p_cat, p_dog, label)
    labels: list[int]  # -1 where the folder does not say
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    submission: Path | None = None
    seconds: float = 0.0

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


def predict(data_dir: str | os.PathLike[str], head_path: str | os.PathLike[str], out: str | os.PathLike[str],
            submission: str | os.PathLike[str] | None = None, weights_file: str | None = None,
            device: str = "auto", batch_size: int = 32, workers: int = -1,
            progress: Progress | None = None) -> PredictReport:
    t0 = time.perf_counter()
    head, meta = load_head(head_path)
    prov = Provenance.from_json(meta["provenance"])
    cfg = ExtractConfig(weights=spec_from_identity(prov.weights, weights_file), arch=prov.arch, device=device,
                        batch_size=batch_size, workers=workers, dtype=prov.dtype, precision=prov.precision,
                        views=tuple(prov.views.split(",")))
    require_same(prov, cfg.provenance(), f"head {head_path}", "this catdog-cache")  # e.g. a changed transform
    disc = discover(data_dir)
    if not disc.samples:
        raise InputError(f"no images found in {data_dir}")
    rels = [s.rel for s in disc.samples]
    probs: dict[int, np.ndarray] = {}
    failed: list[tuple[str, str]] = []
    for idx, feats, _, failures in run_features(disc.root, rels, cfg, progress=progress):
        # Round through the cache's storage dtype: the head must see exactly what it was trained on.
        x = torch.from_numpy(feats.astype(prov.dtype).astype(np.float32))  # [B, V, 4096]
        with torch.no_grad():
            p = head(x.flatten(0, 1)).softmax(1).reshape(x.shape[0], x.shape[1], 2)[:, 0]  # [B, 2], first view
        for j, i in enumerate(idx):
            probs[i] = p[j].numpy()
        failed += [(rels[i], reason) for i, _, reason in failures]
    rows = [(rels[i], float(probs[i][0]), float(probs[i][1]), "dog" if probs[i][1] > probs[i][0] else "cat")
            for i in sorted(probs)]
    labels = [disc.samples[i].label for i in sorted(probs)]
    out = Path(out)
    if submission:
        submission = Path(submission)
        write_submission(submission, rows)
    write_csv_atomic(out, ["path", "p_cat", "p_dog", "label"], rows)
    return PredictReport(out, rows, labels, failed, disc.skipped, submission, time.perf_counter() - t0)


def write_submission(path: Path, rows: list[tuple[str, float, float, str]]) -> None:
    """Kaggle Redux format: `id,label` with label = P(dog), id from the numeric file name, sorted by id."""
    ids = []
    for rel, _, p_dog, _ in rows:
        stem = Path(rel).name.split(".")[0]
        if not stem.isdigit():
            raise InputError(f"--submission needs numeric file names like 123.jpg; {rel!r} is not")
        ids.append((int(stem), p_dog))
    write_csv_atomic(path, ["id", "label"], [(i, f"{p:.6f}") for i, p in sorted(ids)])
