"""What fit writes: the head beside its cache (never over one of other features), its report, its pictures."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from catdog_cache.fit.calibration import CLIP_CANDIDATES
from catdog_cache.fit.head import load_head
from tests.conftest import TINY, png_ok


def test_default_head_sits_beside_its_cache(cli, kaggle_dir, tmp_path):
    cli("extract", kaggle_dir, *TINY, "--cache", tmp_path / "other" / "folder.h5")
    r = cli("fit", "--cache", tmp_path / "other" / "folder.h5", "--epochs", "1")
    assert (tmp_path / "other" / "folder.head.pt").is_file() and (tmp_path / "other" / "folder.head.png").is_file()
    assert "folder.head.pt" in r.output and not Path("cache/features.head.pt").exists()


def test_fit_refuses_to_replace_a_head_of_other_features(cli, kaggle_dir, folder_dir, tmp_path):
    """Item 2: `fit --cache lite1.h5 --head lite2.head.pt` replaced a head trained on other features."""
    a, b, head = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "h.head.pt"
    cli("extract", kaggle_dir, *TINY, "--cache", a)
    cli("extract", folder_dir, *TINY, "--cache", b)
    cli("fit", "--cache", a, "--head", head, "--epochs", "1")
    cli("fit", "--cache", a, "--head", head, "--epochs", "2")  # refitting on the same features: fine
    kept = head.read_bytes()
    r = cli("fit", "--cache", b, "--head", head, "--epochs", "1", ok=False)
    assert r.exit_code == 1 and "--overwrite" in r.output and "a.h5" in r.output and "b.h5" in r.output, r.output
    assert head.read_bytes() == kept
    cli("fit", "--cache", b, "--head", head, "--epochs", "1", "--overwrite")
    assert head.read_bytes() != kept
    c = tmp_path / "c.h5"  # other provenance (two views): refused too
    cli("extract", kaggle_dir, *TINY, "--views", "center,flip", "--cache", c)
    r = cli("fit", "--cache", c, "--head", head, "--epochs", "1", ok=False)
    assert r.exit_code == 1 and "--overwrite" in r.output
    (tmp_path / "notes.txt").write_text("precious")
    r = cli("fit", "--cache", a, "--head", tmp_path / "notes.txt", "--epochs", "1", ok=False)
    assert r.exit_code == 1 and (tmp_path / "notes.txt").read_text() == "precious"


def test_fit_reports_confusion_curve_and_calibration(cli, kaggle_dir, tmp_path):
    cli("extract", kaggle_dir, *TINY)
    r = cli("fit", "--epochs", "4", "--calibrate", "--val-fraction", "0.5")
    assert "recall" in r.output and "precision" in r.output and "temperature" in r.output and "log loss" in r.output
    png = Image.open(tmp_path / "cache" / "features.head.png")
    assert png.format == "PNG" and png.size[0] > 600 and png.size[1] > 300
    _, meta = load_head(tmp_path / "cache" / "features.head.pt")
    floor = 1 / (meta["metrics"]["n_val"] + 2)  # the clip is never below 1/(n+2) of the n validation predictions
    assert 0.05 <= meta["temperature"] <= 20 and (meta["clip"] == floor or floor < meta["clip"] in CLIP_CANDIDATES)
    data = json.loads(cli("fit", "--epochs", "2", "--json").output)
    assert data["n_train"] + data["n_val"] == 12 and len(data["history"]) == 2
    assert set(data["per_class_acc"]) == {"cat", "dog"} and sum(map(sum, data["confusion"])) == data["n_val"]


def test_fit_writes_fold_curves_and_reliability_diagram(cli, kaggle_dir, tmp_path: Path) -> None:
    cli("extract", kaggle_dir, *TINY)
    r = json.loads(cli("fit", "--epochs", "4", "--folds", "3", "--calibrate", "--json").output)
    assert r["fold_curve"] == "cache/features.head.folds.png"
    assert r["reliability"] == "cache/features.head.reliability.png"
    for key in ("curve", "fold_curve", "reliability"):
        w, h = png_ok(Path(r[key]))
        assert w > 300 and h > 300
    text = cli("fit", "--epochs", "4", "--calibrate").output  # no --folds: a validation split, no fold curves
    assert "reliability diagram: cache/features.head.reliability.png" in text and "fold curves" not in text


def test_refit_removes_pictures_that_describe_the_old_head(cli, kaggle_dir):
    """A refit without --folds/--calibrate left the previous head's fold curves and reliability diagram beside the
    new head, where they read as this head's."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "2", "--folds", "2", "--calibrate")
    folds, reliability = Path("cache/features.head.folds.png"), Path("cache/features.head.reliability.png")
    assert folds.exists() and reliability.exists()
    cli("fit", "--epochs", "2")
    assert Path("cache/features.head.png").exists()
    assert not folds.exists() and not reliability.exists()
