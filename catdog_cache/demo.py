"""The main job on an embedded default: draw a small cat/dog sample set, then extract -> fit -> predict."""

from __future__ import annotations

import contextlib
import io
import os
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import InputError


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
    """root/train/{cat,dog}/N.jpg and root/test/N.jpg (numeric names, as Kaggle's test1). Every folder and file is
    created without following links, files exclusively: one that exists (a rerun: the same seeded bytes) is kept."""
    rng = random.Random(seed)
    train, test = root / "train", root / "test"
    for kind in ("cat", "dog"):
        new_folder(train / kind, root.parent)
        for i in range(per_class):
            create_new(train / kind / f"{i}.jpg", jpeg(draw_animal(kind, rng)))
    new_folder(test, root.parent)
    for i in range(1, n_test + 1):
        create_new(test / f"{i}.jpg", jpeg(draw_animal("cat" if i % 2 else "dog", rng)))
    return train, test


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def new_folder(path: Path, base: Path) -> None:
    """mkdir -p of `path` below `base` that refuses a link (or a file) where a folder should be, at every level under
    `base` it creates or finds. `base` is the user's --folder: made as given."""
    base.mkdir(parents=True, exist_ok=True)
    p = base
    for part in path.relative_to(base).parts:
        p = p / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(p)
        if not stat.S_ISDIR(os.lstat(p).st_mode):
            raise InputError(f"{p} is not a folder the demo made (a link or a file); nothing was written through it")


def create_new(path: Path, data: bytes) -> None:
    """O_CREAT|O_EXCL|O_NOFOLLOW: never writes through a planted link or into an existing (maybe hard-linked) file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


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


MARKER_TEXT = b"made by catdog-cache demo; it reuses this folder and deletes nothing\n"
MAX_ENTRIES = 10_000  # a demo folder holds about 100 entries; walking an unbounded tree is not worth it


def our_marker(path: Path) -> bool:
    """`path` itself (never a link's target) is a regular file owned by this user, and not a hard link."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def planted_link(folder: Path) -> Path | None:
    """A symbolic link anywhere in the folder (the demo never makes one), or the folder itself if it is too big."""
    seen = 0
    for top, dirs, files in os.walk(folder):  # does not descend into linked folders
        for name in dirs + files:
            seen += 1
            if seen > MAX_ENTRIES or os.path.islink(os.path.join(top, name)):
                return Path(top) / name
    return None


def claim(folder: Path) -> None:
    """Refuse a folder the demo did not make (another user's, or one with a link planted in it); nothing is ever
    deleted. The demo's marker must be a plain file owned by this user, not a link or a hard link."""
    marker = folder / MARKER
    if folder.exists():
        mine = folder.is_dir() and folder.stat().st_uid == os.geteuid()  # followed: the user's own path
        if not mine or (any(folder.iterdir()) and not our_marker(marker)):
            raise InputError(f"--folder {folder} exists and was not made by the demo: give a new or empty folder "
                             "(nothing was changed)")
        link = planted_link(folder)
        if link is not None:
            raise InputError(f"--folder {folder} holds {link}, which the demo did not make (a symbolic link, or too "
                             "many files): give a new or empty folder (nothing was changed)")
    folder.mkdir(parents=True, exist_ok=True)
    create_new(marker, MARKER_TEXT)


def run_demo(
    folder: Path,
    weights: str | None = None,
    backbone: str | None = None,
    epochs: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoReport:
    from .backbone import parse_weights
    from .engines.dispatch import extract
    from .extract.config import ExtractConfig
    from .fit import FitConfig, fit
    from .score.predict import predict
    from .score.preview import preview

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
