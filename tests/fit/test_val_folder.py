"""fit --val DIR (issue 31, item 6): a labeled folder of the user's own is the validation set instead of the hash
split, its features cached beside the head as predict caches a folder's, with the training cache's provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from catdog_cache.backbone import WeightsSpec
from catdog_cache.cache import read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit.head import load_head
from tests.conftest import TINY, draw, lines

CFG = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0)


def split_set(root: Path, classes: tuple[str, ...] = ("ants", "bees"), train: int = 6, val: int = 3) -> Path:
    """The PyTorch tutorial's layout: train/<class>/ and val/<class>/, different images in each."""
    for c, name in enumerate(classes):
        for i in range(train):
            draw(root / "train" / name / f"{i}.jpg", ("cat", "dog")[c % 2], 100 * c + i)
        for i in range(val):
            draw(root / "val" / name / f"v{i}.jpg", ("cat", "dog")[c % 2], 100 * c + 50 + i)
    return root


def test_val_folder_replaces_the_split_and_predict_reuses_its_features(cli, tmp_path):
    root = split_set(tmp_path / "hym")
    cli("extract", root / "train", *TINY)
    r = cli("fit", "--val", root / "val", "--epochs", "3", "--json")
    data = json.loads(r.stdout)
    # every labeled training image trains (no hash split), the folder's 6 images validate
    assert (data["n_train"], data["n_val"]) == (12, 6)
    assert [p["support"] for p in data["report"]["per_class"]] == [3, 3]
    assert data["val"]["folder"] == str((root / "val").resolve()) and data["val"]["rows"] == 6
    assert data["val"]["extracted"] == 6 and all(math.isfinite(h["val_loss"]) for h in data["history"])
    # cached beside the head, named for the folder and the provenance, with the training cache's provenance
    (val_cache,) = map(Path, data["val"]["caches"])
    assert val_cache.parent == (tmp_path / "cache").resolve() and val_cache.name.startswith("val.")
    assert read_index(val_cache).provenance == read_index("cache/features.h5").provenance
    _, meta = load_head("cache/features.head.pt")
    assert meta["val"] == {"folder": str((root / "val").resolve()), "rows": 6, "caches": [str(val_cache)]}
    assert meta["metrics"]["n_val"] == 6 and meta["config"]["val_fraction"] == 0.0
    shown = json.loads(cli("info", "cache/features.head.pt", "--json").stdout)  # info on a head: its validation
    assert shown["validation"]["folder"] == str((root / "val").resolve()) and shown["validation"]["val_rows"] == 6
    # predict on the same folder reads the features fit cached (no backbone pass) and scores what fit reported
    p = json.loads(cli("predict", root / "val", "--json").stdout)
    assert p["extracted"] == 0 and p["cache"] == [str(Path("cache") / val_cache.name)]
    assert p["log_loss"] == pytest.approx(data["val_log_loss"], abs=1e-6)
    assert p["report"]["confusion"] == data["report"]["confusion"]
    # a second fit reads them back too
    again = json.loads(cli("fit", "--val", root / "val", "--epochs", "3", "--json").stdout)
    assert again["val"]["extracted"] == 0 and again["val_log_loss"] == data["val_log_loss"]


def test_keep_best_picks_the_val_folders_lowest_epoch(cli, tmp_path):
    root = split_set(tmp_path / "hym")
    cli("extract", root / "train", *TINY)
    r = cli("fit", "--val", root / "val", "--epochs", "6", "--keep", "best", "--lr", "0.05", "--json")
    data = json.loads(r.stdout)
    losses = [h["val_loss"] for h in data["history"]]
    assert data["kept_epoch"] == losses.index(min(losses)) + 1
    assert data["val_log_loss"] == pytest.approx(min(losses), abs=1e-5)  # the kept head is that epoch's
    text = cli("fit", "--val", root / "val", "--epochs", "2").output
    assert "precision" in text and "recall" in text and str((root / "val").resolve()) in text


@pytest.mark.parametrize(("make", "says"), [
    (lambda v: draw(v / "wasps" / "1.jpg", "cat", 7), "classes the training cache lacks: wasps"),
    (lambda v: [p.unlink() for p in (v / "bees").iterdir()], "no images of bees"),
])
def test_val_classes_must_be_the_training_classes(cli, tmp_path, make, says):
    root = split_set(tmp_path / "hym")
    cli("extract", root / "train", *TINY)
    make(root / "val")
    r = cli("fit", "--val", root / "val", "--epochs", "1", ok=False)
    assert r.exit_code == 1 and says in r.output and "must hold the training classes (ants, bees)" in r.output
    assert len(lines(r.output)) == 1 and not Path("cache/features.head.pt").exists()


def test_refusals_are_one_line(cli, tmp_path):
    root = split_set(tmp_path / "hym")
    cli("extract", root / "train", *TINY)
    draw(tmp_path / "flat" / "1.jpg", "cat", 1)
    draw(tmp_path / "flat" / "2.jpg", "dog", 2)
    for args, says in [
        (("--val", root / "train"), "overlaps the training folder"),  # its images would be trained on
        (("--val", root / "train" / "ants"), "overlaps the training folder"),
        (("--val", tmp_path / "nowhere"), "folder not found"),
        (("--val", root), "validate on the others with fit --val"),  # the split data set itself
        (("--val", tmp_path / "flat"), "has no labeled images"),
        (("--val", root / "val", "--folds", "3"), "--val and --folds"),
        (("--val", root / "val", "--val-cache", "cache/features.h5"), "is a training cache"),
    ]:
        r = cli("fit", *args, "--epochs", "1", ok=False)
        assert r.exit_code == 1 and says in r.output and len(lines(r.output)) == 1, (args, r.output)
    assert not Path("cache/features.head.pt").exists()


def test_val_cache_of_other_features_is_refused(cli, tmp_path):
    root = split_set(tmp_path / "hym")
    cli("extract", root / "train", *TINY)
    cli("extract", root / "val", *TINY, "--seed", "1", "--cache", "other.h5")  # other random weights
    r = cli("fit", "--val", root / "val", "--val-cache", "other.h5", "--epochs", "1", ok=False)
    assert r.exit_code == 1 and "--val-cache other.h5 holds features made differently" in r.output
    assert "weights" in r.output and len(lines(r.output)) == 1
    assert read_index("other.h5").provenance.weights.startswith("random:seed=1")  # neither used nor changed
    ok = json.loads(cli("fit", "--val", root / "val", "--val-cache", "mine.h5", "--epochs", "1", "--json").stdout)
    assert ok["val"]["caches"] == [str(Path("mine.h5").resolve())] and ok["n_val"] == 6


@pytest.mark.parametrize("augment", [False, True])
def test_streamed_fit_with_val_equals_in_memory(tmp_path, augment):
    """The validation rows join the training features behind one callable: streamed from disk or in memory, with
    every view or one, the same batches and so the same head and validation numbers."""
    root = split_set(tmp_path / "hym", train=40)
    cfg_x = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0,
                          views=("center", "flip") if augment else ("center",))
    extract(root / "train", tmp_path / "f.h5", cfg_x)
    cfg = FitConfig(epochs=3, augment=augment)
    a = fit(tmp_path / "f.h5", tmp_path / "a.pt", cfg, val=root / "val", curve=False)
    kw = {} if augment else {"budget_bytes": 1}  # --augment needs every view in memory
    b = fit(tmp_path / "f.h5", tmp_path / "b.pt", cfg, val=root / "val", curve=False, **kw)
    assert b.streamed != augment and a.n_val == b.n_val == 6 and a.n_train == 80
    assert [h.val_loss for h in a.history] == [h.val_loss for h in b.history]
    ha, hb = load_head(tmp_path / "a.pt")[0], load_head(tmp_path / "b.pt")[0]
    assert all(torch.equal(x, y) for x, y in zip(ha.state_dict().values(), hb.state_dict().values(), strict=True))
    assert b.val["extracted"] == 0  # the first fit cached them beside its head; the second head is beside it too


def test_ensemble_val_joins_each_backbones_features(tmp_path):
    root = split_set(tmp_path / "hym")
    extract(root / "train", tmp_path / "a.h5", CFG)
    extract(root / "train", tmp_path / "b.h5", ExtractConfig(weights=WeightsSpec("random", seed=1), backbone="tiny",
                                                             workers=0))
    r = fit([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "h.pt", FitConfig(epochs=2), val=root / "val",
            curve=False)
    assert r.n_val == 6 and len(r.val["caches"]) == 2 and len(set(r.val["caches"])) == 2
    for c, train in zip(r.val["caches"], ("a.h5", "b.h5"), strict=True):
        assert read_index(c).provenance == read_index(tmp_path / train).provenance
