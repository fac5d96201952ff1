"""Issue 31, item 11: what a new user met, the smaller things. info on a head, JSON errors, no empty cache folder
after a failed extract, a mismatch that names its fields, verify's help, preview titles that count what they show,
an ensemble named whole, and pytest's skip reasons."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from catdog_cache import plots
from tests.conftest import TINY, draw, lines


@pytest.fixture
def titles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The title of every preview grid drawn (the grid is still drawn, by the real function)."""
    seen: list[str] = []
    real = plots.prediction_grid

    def spy(images, captions, wrong, path, cols=4, title=""):
        seen.append(title.replace("\n", " "))
        return real(images, captions, wrong, path, cols, title)

    monkeypatch.setattr(plots, "prediction_grid", spy)
    return seen


@pytest.fixture
def ensemble(cli, kaggle_dir) -> Path:
    """A head on two feature sets: the same backbone with two seeds (two caches, two weights identities)."""
    for seed in ("0", "1"):
        cli("extract", kaggle_dir, *TINY, "--seed", seed, "--cache", f"cache/s{seed}.h5", "-q")
    cli("fit", "--cache", "cache/s0.h5", "--cache", "cache/s1.h5", "--head", "cache/ens.head.pt", "--epochs", "1")
    return Path("cache/ens.head.pt")


def test_info_describes_a_head(cli, kaggle_dir):
    """`info HEAD.pt` said "no cache" (then "is a head"): it now says what the head is and how it scored."""
    cli("extract", kaggle_dir, *TINY, "-q")
    fit = json.loads(cli("fit", "--epochs", "2", "--json").output)
    r = cli("info", "cache/features.head.pt")
    text = " ".join(r.output.split())
    for expected in ("a head, written by fit", "classes", "2: cat, dog", "tiny fc7, weights random:seed=0",
                     "epochs", f"accuracy {fit['val_acc']:.4f}", str(kaggle_dir.resolve()),
                     str(Path("cache/features.h5").resolve())):
        assert expected in text, (expected, r.output)
    data = json.loads(cli("info", "--head", "cache/features.head.pt", "--json").stdout)
    assert data["kind"] == "head" and data["classes"] == ["cat", "dog"] and data["epochs"] == 2
    assert [(b["arch"], b["layer"], b["weights"]) for b in data["backbones"]] == [("tiny", "fc7", "random:seed=0")]
    assert data["validation"]["accuracy"] == pytest.approx(fit["val_acc"])
    assert data["validation"]["log_loss"] == pytest.approx(fit["val_log_loss"])
    assert data["sources"] == [str(kaggle_dir.resolve())] and data["random_weights"] is True


def test_info_json_errors_are_json(cli, tmp_path):
    r = cli("info", "--json", tmp_path / "nothing.h5", ok=False)
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {"error": f"no cache at {tmp_path / 'nothing.h5'}: run `catdog-cache extract "
                                             "DATA_DIR` first"}
    (tmp_path / "bad.head.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    r = cli("info", "--json", "--head", tmp_path / "bad.head.pt", ok=False)
    assert r.exit_code == 1 and "bad.head.pt" in json.loads(r.stdout)["error"]
    r = cli("info", tmp_path / "nothing.h5", ok=False)  # without --json: the one line, as before
    assert r.stdout == "" and lines(r.output) == [f"error: no cache at {tmp_path / 'nothing.h5'}: run `catdog-cache "
                                                  "extract DATA_DIR` first"]


def test_a_failed_extract_leaves_no_empty_cache_folder(cli, kaggle_dir):
    """Only the folders the run created, and only when empty: an existing folder stays."""
    for cache in ("cache/features.h5", "new/deeper/c.h5"):
        r = cli("extract", kaggle_dir, "--backbone", "tiny", "--cache", cache, ok=False)  # tiny: random weights only
        assert r.exit_code == 1 and "--weights random" in r.output
    assert not Path("cache").exists() and not Path("new").exists()
    Path("mine").mkdir()
    cli("extract", kaggle_dir, "--backbone", "tiny", "--cache", "mine/c.h5", ok=False)
    assert Path("mine").is_dir()


def test_a_feature_mismatch_names_the_differing_fields(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY, "-q")
    r = cli("extract", kaggle_dir, *TINY, "--decoder", "pil-draft", ok=False)
    text = " ".join(r.output.split())
    assert r.exit_code == 1
    assert "(transform decoder: the cache has pil, this extract has pil-draft)" in text, r.output
    assert '"mean"' not in text and '"crop"' not in text  # not two whole JSON transforms


def test_verify_help_says_balanced_over_the_classes(cli):
    assert "balanced over the classes" in " ".join(cli("verify", "--help").output.split())


def test_preview_title_counts_the_mistakes_shown(cli, kaggle_dir, titles, tmp_path):
    """Each cat drawing twice, once named a dog: the same features, the same prediction, so exactly one of each pair
    is a mistake (3). --worst 5 showed them under "the 5 most confident mistakes"."""
    cli("extract", kaggle_dir, *TINY, "-q")
    cli("fit", "--epochs", "1", "-q")
    mixed = tmp_path / "mixed"
    for i in range(3):
        draw(mixed / f"cat.{i}.jpg", "cat", 500 + i)
        shutil.copyfile(mixed / f"cat.{i}.jpg", mixed / f"dog.{i}.jpg")
    r = cli("preview", mixed, "--worst", "5", "--out", tmp_path / "worst.png")
    assert "3 images, 3 wrong" in r.output
    assert titles[-1].endswith("; 3 mistakes among 6 images"), titles
    cli("preview", mixed, "--worst", "2", "--out", tmp_path / "two.png")
    assert titles[-1].endswith("; the 2 most confident of 3 mistakes among 6 images"), titles
    cli("preview", mixed, "--n", "4", "--out", tmp_path / "grid.png")
    assert titles[-1].endswith("; 4 of 6 images"), titles


def test_an_ensembles_title_names_every_backbone_with_its_weights(cli, kaggle_dir, ensemble, titles, tmp_path):
    cli("preview", kaggle_dir, "--head", ensemble, "--out", tmp_path / "p.png", "--split", "all")
    assert "on tiny fc7 (weights random:seed=0) + tiny fc7 (weights random:seed=1) features" in titles[-1], titles


def test_an_ensembles_predict_counts_images_times_backbones(cli, ensemble, tmp_path):
    new = tmp_path / "new"
    for i in range(3):
        draw(new / f"{i}.jpg", "dog", 700 + i)
    r = cli("predict", new, "--head", ensemble, "--out", tmp_path / "p.csv")
    text = " ".join(r.output.split())
    assert "(3 images × 2 backbones extracted now)" in text, r.output
    assert not re.search(r"\(6 extracted now\)", text)


def test_pytest_reports_skip_reasons(pytestconfig):
    """pyproject.toml's addopts, as pytest read them: a skipped check says why in every run's summary."""
    flags = [a[2:] for a in pytestconfig.getini("addopts") if a.startswith("-r")]
    assert flags and all(c in flags[-1] for c in "fEs"), flags  # skips say why; failures still listed
