"""plots.py: the matplotlib training curve (its kept-epoch labels over no curve), fold curves, the reliability
diagram, the prediction grid, and the exclusive-temp-file PNG writer."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catdog_cache.errors import InputError
from catdog_cache.plots import (
    _save_atomic,
    covers_curve,
    fold_curves_figure,
    prediction_grid,
    reliability_figure,
    training_curve,
    training_curve_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float


def history(n: int = 6, val: bool = True) -> list[Epoch]:
    nan = float("nan")
    return [Epoch(i, 0.7 / i, 0.6 + 0.05 * i, 0.75 / i if val else nan, 0.55 + 0.05 * i if val else nan)
            for i in range(1, n + 1)]


def pixels(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_curve_is_a_png_and_marks_the_kept_epoch(tmp_path: Path) -> None:
    plain = training_curve(history(), tmp_path / "plain.png")
    kept = training_curve(history(), tmp_path / "kept.png", kept_epoch=2)
    assert plain == tmp_path / "plain.png" and kept == tmp_path / "kept.png"
    a, b = pixels(plain), pixels(kept)
    h, w, _ = a.shape
    assert 600 <= w <= 2000 and 250 <= h <= 1000 and w > h  # two panels side by side
    assert a.shape == b.shape
    assert (a != b).any(axis=2).sum() > 100  # the dashed line and its labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png", "plain.png"]  # no temp leftovers


def test_curve_without_validation_does_not_crash(tmp_path: Path) -> None:
    out = training_curve(history(val=False), tmp_path / "noval.png", kept_epoch=6)
    assert pixels(out).shape[0] > 0
    # scattered NaNs and a single epoch are fine too
    h = history(3)
    h[1].val_loss = math.nan
    pixels(training_curve(h, tmp_path / "gap.png"))
    pixels(training_curve(history(1), tmp_path / "one.png", kept_epoch=1))


def test_grid_frames_wrong_right_and_unknown(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=gen) for _ in range(5)]
    captions = ["cat 0.91 WRONG  cat.1.jpg", "dog 0.80 ok  dog.2.jpg", "cat 0.55\nunlabelled.jpg", "a", "b"]
    wrong = [True, False, None, False, True]
    out = prediction_grid(images, captions, wrong, tmp_path / "sub" / "grid.png", cols=3)
    px = pixels(out).astype(int)
    h, w, _ = px.shape
    assert w >= 3 * 80 and h >= 2 * 64
    red = (abs(px[..., 0] - 214) < 20) & (abs(px[..., 1] - 39) < 20) & (abs(px[..., 2] - 40) < 20)
    green = (abs(px[..., 0] - 44) < 20) & (abs(px[..., 1] - 160) < 20) & (abs(px[..., 2] - 44) < 20)
    assert red.sum() > 200 and green.sum() > 200  # the frames
    assert os.listdir(tmp_path / "sub") == ["grid.png"]


def test_grid_rejects_mismatched_lengths(tmp_path: Path) -> None:
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError):
        prediction_grid([img, img], ["one"], [None, None], tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_planted_symlink_at_temp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "x.png.tmp").symlink_to(victim)  # the name the old writer used
    training_curve(history(), out_dir / "x.png", kept_epoch=3)
    assert victim.read_bytes() == b"precious"
    assert (out_dir / "x.png.tmp").is_symlink()
    pixels(out_dir / "x.png")
    assert sorted(os.listdir(out_dir)) == ["x.png", "x.png.tmp"]


def test_symlink_at_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "x.png").symlink_to(victim)
    training_curve(history(), tmp_path / "x.png")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "x.png").is_symlink()
    pixels(tmp_path / "x.png")


def test_directory_target_raises_input_error(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        training_curve(history(), tmp_path / "d.png")
    with pytest.raises(InputError, match="is a directory"):
        prediction_grid([torch.zeros(3, 8, 8, dtype=torch.uint8)], ["x"], [None], tmp_path / "d.png")
    assert os.listdir(tmp_path) == ["d.png"] and os.listdir(tmp_path / "d.png") == []


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def boom(f) -> None:
        f.write(b"half a png")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save_atomic(boom, target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.png"]


def test_saved_png_gets_umask_mode_not_mkstemp_0600(tmp_path: Path) -> None:
    out = _save_atomic(lambda f: f.write(PNG_MAGIC), tmp_path / "m.png")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def overfitting_history(n: int = 20) -> list[Epoch]:
    """The issue's shape: validation loss bottoms early and climbs, accuracies end at the top right corner."""
    return [Epoch(i, 0.3 / i, min(1.0, 0.9 + 0.01 * i), 0.017 + 0.0008 * (i - 3) ** 2 / 4 + 0.3 / i ** 3,
                  min(1.0, 0.95 + 0.004 * i)) for i in range(1, n + 1)]


def kept_labels(fig) -> list:
    return [t for ax in fig.axes for t in ax.texts if t.get_text().startswith(("kept:", "final head:"))]


@pytest.mark.parametrize("kept", [20, 3, 11])
def test_kept_label_covers_no_curve(kept: int) -> None:
    fig = training_curve_figure(overfitting_history(), kept_epoch=kept)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = kept_labels(fig)
    assert len(labels) == 2 and all(t.get_text() == f"kept: epoch {kept}" for t in labels)
    for ax, label in zip(fig.axes[:2], labels, strict=True):
        curves = [np.asarray(ax.transData.transform(line.get_xydata())) for line in ax.get_lines()
                  if line.get_gid() != "marker-line"]
        box = label.get_bbox_patch().get_window_extent(renderer)
        assert len(curves) == 2 and not covers_curve(box, curves), (kept, ax.get_title())
        assert ax.get_window_extent(renderer).contains(box.x0, box.y0)


def test_fold_curves_figure_has_one_curve_per_fold_and_their_mean() -> None:
    histories = [overfitting_history(8), overfitting_history(8), overfitting_history(8)]
    fig = fold_curves_figure(histories, final_epochs=3)
    loss = fig.axes[0]
    labels = [line.get_label() for line in loss.get_lines()]
    assert [x for x in labels if x.startswith("fold")] == ["fold 1", "fold 2", "fold 3"]
    assert "mean of folds" in labels and "final head: 3 epochs" in labels
    assert loss.get_title() == "held-out log loss" and "3-fold" in fig.get_suptitle()
    assert len(kept_labels(fig)) == 2


def test_reliability_figure_bins_predictions_with_counts() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(int)  # calibrated by construction
    fig = reliability_figure({"as trained": p, "calibrated": np.clip(p, 0.05, 0.95)}, y)
    top, bottom = fig.axes
    assert [line.get_label().split(" (")[0] for line in top.get_lines()] == ["perfectly calibrated", "as trained",
                                                                              "calibrated"]
    counts = [int(t.get_text()) for t in bottom.texts if t.get_text()]
    assert sum(counts) == 600  # both curves' images, each once
    assert bottom.get_xlabel() == "predicted P(dog)" and "observed" in top.get_ylabel()
