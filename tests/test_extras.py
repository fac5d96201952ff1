"""Reports, pictures, calibration, export, the Python API and test-time augmentation."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catdog_cache.fit.head import load_head
from tests.conftest import TINY


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.fixture
def trained(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "3", "--calibrate")
    return kaggle_dir


def test_fit_reports_confusion_curve_and_calibration(cli, kaggle_dir, tmp_path):
    cli("extract", kaggle_dir, *TINY)
    r = cli("fit", "--epochs", "4", "--calibrate", "--val-fraction", "0.5")
    assert "class accuracy" in r.output and "temperature" in r.output and "log loss" in r.output
    png = Image.open(tmp_path / "cache" / "features.head.png")
    assert png.format == "PNG" and png.size[0] > 600 and png.size[1] > 300
    _, meta = load_head(tmp_path / "cache" / "features.head.pt")
    assert 0.05 <= meta["temperature"] <= 20 and meta["clip"] in (0.0, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.03, 0.05)
    data = json.loads(cli("fit", "--epochs", "2", "--json").output)
    assert data["n_train"] + data["n_val"] == 12 and len(data["history"]) == 2
    assert set(data["per_class_acc"]) == {"cat", "dog"} and sum(map(sum, data["confusion"])) == data["n_val"]


def test_calibration_lowers_log_loss_of_overconfident_logits():
    from catdog_cache.fit import calibrate

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=g)
    signal = (2 * y - 1).float() + torch.randn(400, generator=g)  # noisy but informative
    logits = torch.stack([-signal, signal], 1) * 8  # far too confident
    c = calibrate(logits, y)
    assert c["temperature"] > 2 and c["log_loss_temperature"] < 0.7 * c["log_loss_before"]
    assert c["log_loss_after"] <= c["log_loss_temperature"] + 1e-12


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


def test_preview_grid_png(cli, trained, tmp_path):
    r = cli("preview", trained, "--out", "grid.png", "--n", "6")
    m = re.search(r"preview (\d+) images, (\d+) wrong", r.output)
    assert m and int(m.group(1)) <= 6  # validation images by default: the 12-image set holds fewer
    m = re.search(r"preview (\d+) images, (\d+) wrong", cli("preview", trained, "--out", "grid.png", "--n", "6",
                                                              "--split", "all").output)
    assert m and int(m.group(1)) == 6
    im = Image.open("grid.png")
    assert im.format == "PNG" and im.size[0] > 4 * 224 and im.size[1] > 2 * 224
    r = cli("preview", trained, "--n", "0", ok=False)
    assert r.exit_code == 1 and "--n" in r.output


def test_export_equals_predict_and_loads_in_plain_pytorch(cli, trained, tmp_path):
    cli("export", "--out", "model.pt2")
    cli("predict", trained, "--model", "model.pt2", "--out", "a.csv")
    cli("predict", trained, "--out", "b.csv")
    a, b = rows("a.csv"), rows("b.csv")
    assert [r[0] for r in a] == [r[0] for r in b]
    np.testing.assert_allclose([float(r[2]) for r in a], [float(r[2]) for r in b], atol=1e-6)
    # the documented few lines of plain PyTorch
    from torchvision.models import VGG16_Weights

    from catdog_cache.sources.decode import decode_rgb

    model = torch.export.load("model.pt2").module()
    x = VGG16_Weights.IMAGENET1K_V1.transforms()(decode_rgb((trained / "cat.0.jpg").read_bytes()))[None]
    p = model(x)
    assert p.shape == (1, 2) and abs(p[0, 1].item() - float(dict((r[0], r[2]) for r in b)["cat.0.jpg"])) < 1e-5
    assert cli("export", "--out", "model.pt", ok=False).exit_code == 1
    r = cli("predict", trained, "--model", "missing.pt2", ok=False)
    assert r.exit_code == 1 and "missing.pt2" in r.output


def test_python_api_example_in_readme_runs(tmp_path):
    """The README's Python example, executed as written (with the tiny test backbone swapped in)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('parse_weights("random")', 'parse_weights("random"), backbone="tiny"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert Path("cache/api/predictions.csv").is_file() and namespace["report"].val_acc >= 0


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
