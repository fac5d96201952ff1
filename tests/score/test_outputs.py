"""predict's CSV files: true labels and per-image log loss, LF endings, the submission's temperature and clip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from catdog_cache.fit.head import load_head
from tests.conftest import TINY, lines, rows


def test_prediction_csv_details(cli, kaggle_dir, test_dir):
    """Item 10: true label and per-image log loss for labeled folders; unrounded submission; LF line endings."""
    cli("extract", kaggle_dir, *TINY)
    r = cli("fit", "--epochs", "2", "--calibrate", "-q")
    assert "calibrated" in lines(r.output)[-1]  # --quiet keeps the calibrated log loss in the summary
    r = cli("predict", kaggle_dir, "--json")
    out = Path("cache/predictions.csv")
    assert b"\r\n" not in out.read_bytes()
    rows = list(csv.DictReader(out.open(newline="")))
    assert list(rows[0]) == ["path", "p_cat", "p_dog", "label", "true_label", "log_loss"]
    assert rows[0]["true_label"] == "cat" and rows[-1]["true_label"] == "dog"
    assert np.mean([float(x["log_loss"]) for x in rows]) == pytest.approx(json.loads(r.output)["log_loss"])
    cli("predict", test_dir, "--submission", "sub.csv")
    assert list(csv.DictReader(out.open(newline="")))[0].keys() == {"path", "p_cat", "p_dog", "label"}
    sub = Path("sub.csv").read_bytes()
    assert b"\r\n" not in sub
    clip = torch.load("cache/features.head.pt", weights_only=True)["clip"]
    p_dog = {Path(x["path"]).stem: float(x["p_dog"]) for x in csv.DictReader(out.open(newline=""))}
    for row in csv.DictReader(sub.decode().splitlines()):
        assert float(row["label"]) == min(max(p_dog[row["id"]], clip), 1 - clip)  # as computed, not rounded


def test_submission_uses_temperature_and_clip(cli, trained, test_dir, tmp_path):
    head, meta = load_head("cache/features.head.pt")
    meta["clip"], meta["temperature"] = 0.05, 1.0
    torch.save(meta, "cache/features.head.pt")
    cli("predict", test_dir, "--submission", "sub.csv")
    labels = [float(r[1]) for r in rows("sub.csv")]
    assert all(0.05 <= p <= 0.95 for p in labels)
    meta["temperature"] = 1000.0  # everything to 0.5
    torch.save(meta, "cache/features.head.pt")
    cli("predict", test_dir, "--out", "flat.csv")
    assert all(abs(float(r[2]) - 0.5) < 1e-3 for r in rows("flat.csv"))
