"""Test-time augmentation: a head fit on views, predict --tta averaging them, and the refusals."""

from __future__ import annotations

import json

from tests.conftest import TINY, rows


def test_tta_views_augment_and_refusals(cli, kaggle_dir, test_dir):
    cli("extract", kaggle_dir, *TINY, "--views", "center,flip", "--cache", "views.h5")
    cli("fit", "--cache", "views.h5", "--head", "aug.pt", "--epochs", "2", "--augment")
    r = cli("predict", test_dir, "--head", "aug.pt", "--tta", "--out", "tta.csv", "--json")
    assert json.loads(r.output)["views"] == ["center", "flip"]
    cli("predict", test_dir, "--head", "aug.pt", "--out", "plain.csv")
    tta, plain = rows("tta.csv"), rows("plain.csv")
    assert [r[0] for r in tta] == [r[0] for r in plain]
    assert any(abs(float(a[2]) - float(b[2])) > 1e-7 for a, b in zip(tta, plain, strict=True))
    # never silently ignored:
    cli("extract", kaggle_dir, *TINY)
    r = cli("fit", "--augment", "--epochs", "1", ok=False)
    assert r.exit_code == 1 and "one view per image" in r.output
    cli("fit", "--epochs", "1")
    r = cli("predict", test_dir, "--tta", ok=False)
    assert r.exit_code == 1 and "--tta" in r.output and "--views center,flip" in r.output
    r = cli("extract", kaggle_dir, *TINY, "--views", "center,flip", ok=False)  # into the one-view cache
    assert r.exit_code == 1 and "views" in r.output
