"""predict: the CLI round trip, probabilities equal to the head on cached rows, errors, odd names."""

import csv

import numpy as np
import torch

from catdog_cache.cache import read_features, read_index
from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit.head import load_head
from tests.conftest import TINY


def read_csv(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))


def test_extract_fit_predict_cli(cli, kaggle_dir, test_dir):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "3")
    r = cli("predict", test_dir, "--submission", "sub.csv")
    assert "predicted 4 images" in r.output
    rows = read_csv("cache/predictions.csv")
    assert rows[0] == ["path", "p_cat", "p_dog", "label"]
    assert [r[0] for r in rows[1:]] == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    for _, pc, pd, lab in rows[1:]:
        assert abs(float(pc) + float(pd) - 1) < 1e-5 and lab == ("dog" if float(pd) > float(pc) else "cat")
    sub = read_csv("sub.csv")
    assert sub[0] == ["id", "label"] and [int(r[0]) for r in sub[1:]] == [1, 2, 3, 4]
    assert all(0 <= float(r[1]) <= 1 for r in sub[1:])


def test_predict_equals_head_on_cached_features(tmp_path, cli, kaggle_dir):
    """predict rebuilds the same backbone + transform: its probabilities equal the head on the cached rows."""
    cli("extract", kaggle_dir, *TINY)
    fit("cache/features.h5", "cache/features.head.pt", FitConfig(epochs=2))
    cli("predict", kaggle_dir)
    head, _ = load_head("cache/features.head.pt")
    x = torch.from_numpy(read_features("cache/features.h5"))
    with torch.no_grad():
        want = head(x).softmax(1)[:, 1].numpy()
    got = {r[0]: float(r[2]) for r in read_csv("cache/predictions.csv")[1:]}
    paths = [p.decode() for p in read_index("cache/features.h5").paths]
    np.testing.assert_allclose([got[p] for p in paths], want, atol=1e-6)
    r = cli("predict", kaggle_dir)
    assert "accuracy" in r.output  # labeled folder: accuracy reported


def test_predict_errors(cli, kaggle_dir, test_dir, tmp_path):
    r = cli("predict", test_dir, ok=False)
    assert r.exit_code == 1 and "no head at cache/features.head.pt" in r.output
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    r = cli("predict", kaggle_dir, "--submission", "s.csv", ok=False)
    assert r.exit_code == 1 and "numeric file names" in r.output and not (tmp_path / "s.csv").exists()
    r = cli("predict", tmp_path / "nowhere", ok=False)
    assert r.exit_code == 1 and "folder not found" in r.output


def test_odd_file_names_round_trip_through_csv(cli, tmp_path):
    import os

    from tests.conftest import draw

    root = tmp_path / "odd"
    names = ["a b.jpg", "ünï.jpg", "new\nline.jpg", os.fsdecode(b"raw\xff.jpg"), 'q,"x".jpg']
    for i, n in enumerate(names):
        draw(root / "cat" / n, "cat", i)
        draw(root / "dog" / n, "dog", 50 + i)
    cli("extract", root, *TINY)
    assert sorted(os.fsdecode(p) for p in read_index("cache/features.h5").paths) == \
        sorted(f"{c}/{n}" for c in ("cat", "dog") for n in names)
    cli("fit", "--epochs", "1")
    cli("predict", root)
    assert sorted(r[0] for r in read_csv("cache/predictions.csv")[1:]) == \
        sorted(f"{c}/{n}" for c in ("cat", "dog") for n in names)
