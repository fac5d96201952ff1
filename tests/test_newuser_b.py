"""Issue 21, what a new user tripped over (second part): slow starts (7), overfitting unflagged (8), the pictures
people expect (9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog_cache.backbone import get_backbone
from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit.loop import overfit
from catdog_cache.plots import covers_curve, fold_curves_figure, reliability_figure, training_curve_figure
from tests.conftest import TINY
from tests.fit.test_fit import synthetic_cache
from tests.test_plots import Epoch

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- 7. slow starts: no torch before the checks

HARNESS = """
import contextlib, io, json, sys
from catdog_cache.cli import main

results = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["catdog-cache", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def run_cli_without_torch(tmp_path: Path, *commands: list[str]) -> list[dict]:
    """Each command through the CLI's main in one fresh interpreter; whether torch was imported after each."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(list(commands))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_listing_and_argument_mistakes_answer_without_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = run_cli_without_torch(tmp_path, ["backbones", "--json"], ["extract", "x", "--backbone", "nope"],
                              ["extract", "empty", "--backbone", "resnet5"], ["extract", "x"],
                              ["fit", "--cache", "missing.h5"], ["fit", "--cache", "missing.h5", "--epochs", "0"],
                              ["predict", "x", "--head", "missing.pt"], ["predict", "empty", "--head", "missing.pt"],
                              ["extract", "empty", "--backbone", "vgg16", "--layer", "fc9"])
    assert [x["torch"] for x in r] == [False] * len(r), [x["err"] for x in r]
    listing = {row["backbone"]: row for row in json.loads(r[0]["out"])}
    assert r[0]["code"] == 0 and listing["vgg16"]["dim"] == 4096 and listing["efficientnet_lite0"]["dim"] == 1280
    assert listing["resnet50"]["gflops"] == pytest.approx(8.17, abs=0.01)
    assert [x["code"] for x in r[1:]] == [1] * (len(r) - 1)
    assert "--backbone 'nope': unknown" in r[1]["err"]
    assert "Did you mean resnet50?" in r[2]["err"]  # the hint's names come from torchvision's source, not its import
    assert "folder not found: x" in r[3]["err"]
    assert "no cache at missing.h5" in r[4]["err"]
    assert "--epochs must be at least 1" in r[5]["err"]
    assert "folder not found: x" in r[6]["err"]
    assert "no head at missing.pt" in r[7]["err"]
    assert "--layer 'fc9'" in r[8]["err"]


def test_backbones_lists_from_descriptions_without_building_models(cli, monkeypatch) -> None:
    from catdog_cache.backbone import Backbone

    def no_model(self, count):
        raise AssertionError(f"{self.name}: a model was built to list it")

    get_backbone.cache_clear()
    monkeypatch.setattr(Backbone, "_meta_pass", no_model)
    rows = json.loads(cli("backbones", "--json").output)
    assert {r["backbone"] for r in rows} >= {"vgg16", "efficientnet_lite0", "resnet50", "vit_b_16"}
    assert all(r["dim"] for r in rows if not r["backbone"].startswith("timm:"))
    get_backbone.cache_clear()


def test_recorded_descriptions_match_the_models() -> None:
    """The sizes the plugins record for the listing are what a meta-device pass of each model gives; the
    torchvision names and weights they record are the installed torchvision's."""
    import torch.hub
    import torchvision
    from torchvision.models import get_model_weights

    from catdog_cache.backbone import Backbone
    from catdog_cache.backbones import tvmodels

    for name, layer in [("vgg16", "fc7"), ("vgg16", "fc6"), ("vgg16", "pool5"), ("efficientnet_lite0", None),
                        ("efficientnet_lite2", None), *[(n, None) for n in tvmodels.LISTED]]:
        b = get_backbone(name, layer)
        dim, gflops = Backbone._meta_pass(b, count=True)
        assert (b.dim, round(b.gflops, 2)) == (dim, pytest.approx(round(gflops, 2), abs=0.01)), name
    for name, listed in tvmodels.LISTED.items():
        weights = get_model_weights(name).DEFAULT
        assert (listed.weights, listed.file) == (weights.name, os.path.basename(weights.url))
    assert tvmodels.classifier_names() == set(torchvision.models.list_models(module=torchvision.models))
    assert tvmodels.hub_dir() == Path(torch.hub.get_dir())  # conftest points TORCH_HOME at the test's folder


def test_early_head_check_says_what_load_head_says(tmp_path: Path) -> None:
    from catdog_cache.cli.precheck import head_file
    from catdog_cache.errors import CacheError
    from catdog_cache.fit.head import load_head

    for path in (tmp_path / "missing.pt", tmp_path):
        with pytest.raises(CacheError) as early:
            head_file(path)
        with pytest.raises(CacheError) as core:
            load_head(path)
        assert str(early.value) == str(core.value)


# ---------------------------------------------------------------- 8. overfitting flagged


def test_overfit_rule() -> None:
    the_report = [0.30, 0.05, 0.017, 0.02, 0.025, 0.032]  # the MLP: best 0.017 at epoch 3, 0.032 kept
    assert overfit(the_report, 6) == {"best_epoch": 3, "best": 0.017, "kept_epoch": 6, "kept": 0.032}
    assert overfit(the_report, 3) is None  # --keep best
    assert overfit([0.012, 0.015], 2) is None  # 25% worse, but 0.003: noise at these losses
    assert overfit([0.30, 0.34], 2) is None  # 0.04 worse, but 13%: epoch-to-epoch wobble of a weak head
    assert overfit([float("nan")] * 3, 3) is None


def noisy_cache(path: Path, n: int = 300, dim: int = 512) -> None:
    """A clear signal and 10% flipped labels: an MLP without dropout learns the signal in a few epochs, then grows
    ever more confident on the flipped validation images, and its validation loss climbs."""
    from catdog_cache.cache import Rows, assemble, write_part
    from tests.fit.test_fit import PROV

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, n)
    x = np.abs(rng.normal(0, 0.1, (n, dim))).astype(np.float32)
    x[:, :16] += 1.0 * y[:, None]  # the features follow y...
    stored = np.where(rng.random(n) < 0.1, 1 - y, y)  # ...the labels only 70% of the time
    write_part(path, "p", PROV, "/synthetic", Rows(features=[r[None] for r in x], paths=[f"{i:05d}.jpg".encode()
               for i in range(n)], labels=stored.tolist(), sha256=[f"{i:064x}" for i in range(n)]), {}, (1, dim))
    assemble(path, PROV, {})


def test_fit_says_when_the_kept_epoch_overfits(cli, tmp_path: Path) -> None:
    noisy_cache(tmp_path / "c.h5")
    args = ["fit", "--cache", tmp_path / "c.h5", "--hidden", "128", "--dropout", "0", "--epochs", "30",
            "--lr", "0.01"]
    r = cli(*args)
    assert "warning: validation log loss was lowest at epoch" in r.output and "--keep best" in r.output
    report = json.loads(cli(*args, "--json").output)
    o = report["overfit"]
    assert o["kept_epoch"] == 30 and o["kept"] > 1.2 * o["best"] and report["kept_epoch"] == 30
    best = cli(*args, "--keep", "best")
    assert "warning" not in best.output  # the best epoch is kept: nothing to say
    folds = json.loads(cli(*args, "--folds", "3", "--json").output)
    assert folds["overfit"] and folds["overfit"]["kept_epoch"] == 30  # the folds' mean held-out curve


def test_no_warning_for_a_head_that_does_not_overfit(tmp_path: Path) -> None:
    synthetic_cache(tmp_path / "c.h5")
    r = fit(tmp_path / "c.h5", tmp_path / "h.pt", FitConfig(epochs=10))
    assert r.overfit == {} and r.overfit_note == ""


# ---------------------------------------------------------------- 9. pictures


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


def png_ok(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


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


def test_preview_grid_is_titled_with_the_head_and_backbone(cli, kaggle_dir, monkeypatch) -> None:
    from catdog_cache import plots

    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "2")
    titles = []
    real = plots.prediction_grid_figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        titles.append(" ".join(t.get_text() for t in fig.texts))
        return fig

    monkeypatch.setattr(plots, "prediction_grid_figure", spy)
    cli("preview", kaggle_dir, "--n", "4")
    assert len(titles) == 1
    title = titles[0].replace("\n", " ")
    assert "features.head.pt" in title and "Linear(4096, 2)" in title and "tiny fc7" in title
    assert png_ok(Path("cache/preview.png"))[0] > 200
