"""The main job on an embedded default: draw a small cat/dog sample set, then extract -> fit -> predict."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import InputError
from .files import write_atomic


def draw_animal(kind: str, rng: random.Random, size: int = 256) -> Image.Image:
    """A cartoon face: cats get pointed ears and whiskers, dogs floppy ears and a tongue. Drawn, not downloaded."""
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    cx, cy = size // 2 + rng.randint(-30, 30), size // 2 + rng.randint(-20, 30)
    r = rng.randint(55, 80)
    fur = (
        rng.choice([(230, 140, 40), (120, 120, 120), (40, 40, 40), (240, 230, 210)])
        if kind == "cat"
        else rng.choice([(140, 90, 40), (200, 160, 100), (60, 40, 30), (230, 220, 200)])
    )
    if kind == "cat":
        for side in (-1, 1):
            ear = [
                (cx + side * r * 0.9, cy - r * 0.3),
                (cx + side * r * 0.75, cy - r * 1.45),
                (cx + side * r * 0.2, cy - r * 0.85),
            ]
            d.polygon(ear, fill=fur, outline=(0, 0, 0))
    else:
        for side in (-1, 1):
            d.ellipse(
                [cx + side * r * 0.85 - r * 0.35, cy - r * 0.6, cx + side * r * 0.85 + r * 0.35, cy + r * 0.9],
                fill=tuple(max(c - 50, 0) for c in fur),
                outline=(0, 0, 0),
            )
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fur, outline=(0, 0, 0))
    for side in (-1, 1):  # eyes
        ex = cx + side * r * 0.4
        d.ellipse(
            [ex - 9, cy - r * 0.3 - 9, ex + 9, cy - r * 0.3 + 9], fill=(20, 120, 20) if kind == "cat" else (30, 20, 10)
        )
    d.ellipse(
        [cx - 8, cy + r * 0.1 - 6, cx + 8, cy + r * 0.1 + 6], fill=(230, 120, 140) if kind == "cat" else (0, 0, 0)
    )
    if kind == "cat":
        for side in (-1, 1):
            for k in (-1, 0, 1):
                d.line(
                    [cx + side * 12, cy + r * 0.2, cx + side * (r + 25), cy + r * 0.2 + k * 12], fill=(0, 0, 0), width=2
                )
    else:
        d.ellipse([cx - 12, cy + r * 0.45, cx + 12, cy + r * 0.95], fill=(220, 60, 80))
    return im


def make_sample_set(root: Path, per_class: int = 24, n_test: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """root/train/{cat,dog}/N.jpg and root/test/N.jpg (numeric names, as Kaggle's test1)."""
    rng = random.Random(seed)
    train, test = root / "train", root / "test"
    for kind in ("cat", "dog"):
        (train / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_animal(kind, rng).save(train / kind / f"{i}.jpg", quality=90)
    test.mkdir(parents=True, exist_ok=True)
    for i in range(1, n_test + 1):
        draw_animal("cat" if i % 2 else "dog", rng).save(test / f"{i}.jpg", quality=90)
    return train, test


MARKER = ".catdog-demo"  # the demo only ever writes into a folder that is new, empty or marked as its own


@dataclass
class DemoReport:
    folder: Path
    weights: str
    backbone: str = "vgg16"
    stages: dict[str, float] = field(default_factory=dict)
    extract: object = None
    fit: object = None
    predict: object = None
    preview: object = None


def default_backbone() -> tuple[str, str]:
    """Real ImageNet weights when they need no download: EfficientNet-Lite0 from the [lite] extra, else VGG16 from
    torchvision's cache; otherwise VGG16 with seeded random weights (the pipeline is real, the accuracy is not)."""
    from .backbone import get_backbone

    for name in ("efficientnet_lite0", "vgg16"):
        if get_backbone(name).offline():
            return name, "imagenet"
    return "vgg16", "random"


def claim(folder: Path) -> None:
    """Refuse a folder the demo did not make; nothing is ever deleted."""
    marker = folder / MARKER
    ours = marker.is_file() and not marker.is_symlink()  # a planted link is not the demo's marker
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not ours)):
        raise InputError(f"--folder {folder} exists and was not made by the demo: give a new or empty folder "
                         "(nothing was changed)")
    write_atomic(folder / MARKER, b"made by catdog-cache demo; it reuses this folder and deletes nothing\n")


def run_demo(
    folder: Path,
    weights: str | None = None,
    backbone: str | None = None,
    epochs: int = 20,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoReport:
    from .backbone import parse_weights
    from .extract import ExtractConfig, extract
    from .fit import FitConfig, fit
    from .predict import predict
    from .preview import preview

    if backbone is None:
        backbone, auto_weights = default_backbone()
        weights = weights or auto_weights
    if weights is None:
        from .backbone import get_backbone

        weights = "imagenet" if get_backbone(backbone).offline() else "random"
    claim(folder)
    report = DemoReport(folder, weights, backbone)
    t = time.perf_counter()
    train_dir, test_dir = make_sample_set(folder / "data")  # seeded: a rerun redraws the same bytes, reused
    report.stages["draw images"] = time.perf_counter() - t
    cfg = ExtractConfig(weights=parse_weights(weights), backbone=backbone)
    cache = folder / f"features-{backbone}-{weights}.h5"  # one cache per backbone and weights: reruns never clash
    head = cache.with_name(cache.stem + ".head.pt")
    t = time.perf_counter()
    report.extract = extract(train_dir, cache, cfg, progress)
    report.stages["extract"] = time.perf_counter() - t
    t = time.perf_counter()
    report.fit = fit(cache, head, FitConfig(epochs=epochs))
    report.stages["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    report.predict = predict(test_dir, head, folder / "predictions.csv", submission=folder / "submission.csv",
                             progress=progress, cache=folder / f"test-{backbone}-{weights}.h5")
    report.stages["predict"] = time.perf_counter() - t
    t = time.perf_counter()
    report.preview = preview(train_dir, head, folder / "preview.png", n=8, which="all")
    report.stages["preview"] = time.perf_counter() - t
    return report
