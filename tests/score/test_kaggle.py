"""The Kaggle workflow on the cache: cached test features, submissions Kaggle accepts, honest log loss."""

import csv
import json
from pathlib import Path

import pytest
import torch

from catdog_cache.fit.head import load_head
from tests.conftest import TINY, draw


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def head(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "2")
    return Path("cache/features.head.pt")


def test_second_predict_runs_no_backbone(cli, head, test_dir, monkeypatch):
    first = json.loads(cli("predict", test_dir, "--json").output)
    assert first["extracted"] == 4 and len(first["cache"]) == 1 and Path(first["cache"][0]).is_file()
    from catdog_cache.backbones import tiny

    def no_backbone(spec):
        raise AssertionError("the backbone ran although the folder is cached")

    monkeypatch.setattr(tiny, "make", no_backbone)
    cli("fit", "--epochs", "3", "--seed", "1", "--head", "cache/other.head.pt")  # another head, same features
    second = json.loads(cli("predict", test_dir, "--head", "cache/other.head.pt", "--json").output)
    assert second["extracted"] == 0 and second["rows"] == 4
    again = json.loads(cli("predict", test_dir, "--json").output)
    assert again["extracted"] == 0 and again["cache"] == first["cache"]
    r = cli("predict", test_dir)
    assert "read from" in r.output and first["cache"][0] in r.output


def test_submission_has_one_row_per_id_and_neutral_for_undecodable(cli, head, test_dir):
    (test_dir / "7.jpg").write_bytes(b"not a jpeg")
    r = cli("predict", test_dir, "--submission", "sub.csv")
    sub = rows("sub.csv")
    assert [int(x[0]) for x in sub[1:]] == [1, 2, 3, 4, 7]
    assert float(sub[-1][1]) == 0.5 and "7.jpg" in r.output and "neutral" in r.output
    assert "(1 neutral)" in r.output


def test_duplicate_and_non_numeric_ids_refused_before_any_forward_pass(cli, head, test_dir, monkeypatch):
    from catdog_cache.backbones import tiny

    monkeypatch.setattr(tiny, "make", lambda spec: (_ for _ in ()).throw(AssertionError("forward pass")))
    draw(test_dir / "01.jpg", "cat", 1)
    r = cli("predict", test_dir, "--submission", "s.csv", ok=False)
    assert r.exit_code == 1 and "same id 1" in r.output and "01.jpg" in r.output
    assert not Path("s.csv").exists()
    (test_dir / "01.jpg").unlink()
    draw(test_dir / "x.jpg", "cat", 2)
    r = cli("predict", test_dir, "--submission", "s.csv", ok=False)
    assert r.exit_code == 1 and "numeric file names" in r.output and not Path("s.csv").exists()


def test_nothing_predictable_exits_non_zero_without_csv(cli, head, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"garbage")
    r = cli("predict", bad, "--out", "p.csv", "--submission", "s.csv", ok=False)
    assert r.exit_code == 1 and "could be" in r.output
    assert not Path("p.csv").exists() and not Path("s.csv").exists()


def test_outputs_checked_before_work(cli, head, test_dir, tmp_path):
    (tmp_path / "adir").mkdir()
    r = cli("predict", test_dir, "--out", tmp_path / "adir", ok=False)
    assert r.exit_code == 1 and "is a folder" in r.output
    assert not list(Path("cache").glob("test1.*.h5"))  # refused before extracting anything


def test_labeled_folder_gets_accuracy_and_log_loss(cli, head, kaggle_dir):
    r = cli("predict", kaggle_dir)
    assert "accuracy" in r.output and "log loss" in r.output
    data = json.loads(cli("predict", kaggle_dir, "--json").output)
    assert 0 <= data["accuracy"] <= 1 and data["log_loss"] > 0 and data["extracted"] == 0  # the training cache


def test_keep_best_keeps_the_lowest_validation_loss_epoch(cli, head):
    data = json.loads(cli("fit", "--epochs", "6", "--keep", "best", "--json").output)
    losses = [h["val_loss"] for h in data["history"]]
    assert data["kept_epoch"] == 1 + losses.index(min(losses))
    _, meta = load_head("cache/features.head.pt")
    assert meta["kept_epoch"] == data["kept_epoch"]


def test_folds_give_out_of_fold_metrics_and_a_head_on_every_image(cli, head, kaggle_dir):
    data = json.loads(cli("fit", "--epochs", "2", "--folds", "3", "--calibrate", "--json").output)
    assert data["n_val"] == 12 and data["n_train"] == 12  # every labeled image predicted out of fold, then trained on
    assert data["folds"]["folds"] == 3 and len(data["folds"]["best_epochs"]) == 3
    assert sum(map(sum, data["confusion"])) == 12 and data["calibration"]["temperature"] > 0
    r = cli("preview", kaggle_dir, "--out", "p.png")
    assert "no val images" in r.output  # a --folds head was trained on every image: none is validation
    r = cli("fit", "--folds", "1", ok=False)
    assert r.exit_code == 1 and "--folds" in r.output


def test_ensemble_of_two_backbones(cli, kaggle_dir, test_dir):
    cli("extract", kaggle_dir, *TINY, "--cache", "cache/a.h5")
    cli("extract", kaggle_dir, "--backbone", "tiny", "--weights", "random", "--seed", "1", "--cache", "cache/b.h5")
    draw(kaggle_dir / "dog.50.jpg", "dog", 50)
    cli("extract", kaggle_dir, *TINY, "--cache", "cache/a.h5")  # a now has dog.50, b does not
    r = cli("fit", "--cache", "cache/a.h5", "--cache", "cache/b.h5", "--epochs", "2", "--head", "cache/ens.pt")
    assert "1 image in only some of the caches" in r.output and "dog.50.jpg" in r.output
    head, meta = load_head("cache/ens.pt")
    assert head.in_dim == 8192 and len(meta["ensemble"]) == 2
    data = json.loads(cli("predict", test_dir, "--head", "cache/ens.pt", "--json").output)
    assert data["rows"] == 4 and len(data["cache"]) == 2 and data["extracted"] == 8  # both backbones ran
    r = cli("export", "--head", "cache/ens.pt", "--out", "ens.pt2", ok=False)
    assert r.exit_code == 1 and "ensemble" in r.output


def test_preview_worst_shows_confident_mistakes(cli, kaggle_dir, tmp_path):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1", "--val-fraction", "0.5")
    r = cli("preview", kaggle_dir, "--worst", "3", "--split", "all", "--out", "worst.png")
    assert Path("worst.png").is_file() and ("wrong" in r.output or "no mistakes" in r.output)
    r = cli("preview", kaggle_dir, "--split", "val", "--out", "val.png")
    assert Path("val.png").is_file()
    r = cli("preview", kaggle_dir, "--split", "nope", ok=False)
    assert r.exit_code == 1 and "--split" in r.output


def test_ensemble_with_augment_joins_views_view_by_view(cli, kaggle_dir, test_dir):
    """fit --augment on several caches trains on view j of every backbone side by side (the same flip of the same
    image), as predict --tta joins them; caches with other views are refused naming the file."""
    import contextlib

    import numpy as np

    from catdog_cache.cache import read_features
    from catdog_cache.fit import FitConfig
    from catdog_cache.fit.data import load

    for seed, name in ((0, "a"), (1, "b")):
        cli("extract", kaggle_dir, "--backbone", "tiny", "--weights", "random", "--seed", str(seed),
            "--views", "center,flip", "--cache", f"cache/{name}.h5")
    caches = [Path("cache/a.h5"), Path("cache/b.h5")]
    with contextlib.ExitStack() as stack:
        data = load(caches, FitConfig(augment=True), 1 << 30, stack)
        assert data.views == 2 and len(data.labels) == 2 * len(data.paths) == 24 and data.dim == 8192
        a, b = read_features(caches[0], view=None), read_features(caches[1], view=None)  # [12, 2, 4096] each
        x = data.features_of(torch.arange(24)).reshape(12, 2, 8192).numpy()
        assert np.array_equal(x, np.concatenate([a, b], axis=-1))  # same row order: both caches list one folder
        assert torch.equal(data.labels, torch.from_numpy(data.raw_labels.astype(np.int64)).repeat_interleave(2))
    cli("fit", "--cache", "cache/a.h5", "--cache", "cache/b.h5", "--augment", "--folds", "3", "--epochs", "2",
        "--head", "cache/ens.pt")
    data = json.loads(cli("predict", test_dir, "--head", "cache/ens.pt", "--tta", "--json").output)
    assert data["views"] == ["center", "flip"] and data["rows"] == 4
    cli("extract", kaggle_dir, *TINY, "--seed", "2", "--cache", "cache/one.h5")
    r = cli("fit", "--cache", "cache/a.h5", "--cache", "cache/one.h5", "--augment", "--head", "x.pt", ok=False)
    assert r.exit_code == 1 and "one.h5" in r.output and "--views" in r.output
