"""Issue 21, what a new user tripped over: held-out photos leaking into training, heads silently replaced, silent
logs, misleading messages, repeated flags, CSV details."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from catdog_cache.cache import read_index
from tests.conftest import TINY, draw


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_scoring_never_adds_a_folder_to_a_training_cache(cli, kaggle_dir, folder_dir):
    """Item 1: `preview HELD_OUT --cache TRAIN` appended the held-out photos to the training cache."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    train = Path("cache/features.h5")
    before = read_index(train)
    for cmd in ("preview", "predict"):
        r = cli(cmd, folder_dir, "--cache", train, ok=False)
        assert r.exit_code == 1 and "drop --cache" in r.output and len(lines(r.output)) == 1, r.output
    after = read_index(train)
    assert after.sources == before.sources and after.paths == before.paths  # nothing added
    cli("preview", folder_dir)  # without --cache: the features go beside the head
    assert read_index(train).sources == before.sources
    cli("preview", kaggle_dir, "--cache", train)  # the training folder itself is read, not extracted
    r = cli("fit", "--epochs", "1", "--json")
    assert json.loads(r.output)["sources"] == [str(kaggle_dir.resolve())]
    assert str(kaggle_dir.resolve()) in cli("fit", "--epochs", "1", "-q").output  # the summary names the folder


def test_training_folder_with_new_files_is_not_extended_by_scoring(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    draw(kaggle_dir / "cat.50.jpg", "cat", 50)  # added after extraction
    r = cli("predict", kaggle_dir, ok=False)
    assert r.exit_code == 1 and "catdog-cache extract" in r.output
    assert b"cat.50.jpg" not in read_index("cache/features.h5").paths


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


def test_logs_get_progress_lines_with_rate_and_eta(cli, kaggle_dir, test_dir, monkeypatch):
    """Item 3: `extract ... > log 2>&1` stayed silent for minutes. CliRunner's stderr is no terminal."""
    from catdog_cache.cli import Bar

    monkeypatch.setattr(Bar, "log_seconds", 0.0)  # a line per callback
    r = cli("extract", kaggle_dir, *TINY, "--batch-size", "4", "--workers", "0")
    progress = [line for line in lines(r.output) if line.startswith("extract ")]
    assert "extract 4/12 (33%)" in progress[0] and progress[-1].startswith("extract 12/12 (100%)"), r.output
    assert any("img/s, ETA " in line for line in progress)
    r = cli("fit", "--epochs", "3")
    assert "fit 3/3 (100%)" in r.output
    r = cli("predict", test_dir, "--batch-size", "2", "--workers", "0")
    assert "predict 2/4 (50%)" in r.output
    assert "predict 2/4" not in cli("predict", test_dir, "-q").output  # --quiet stays quiet
    monkeypatch.setattr(Bar, "log_seconds", 3600.0)  # a short run in a log: no progress lines at all
    r = cli("extract", kaggle_dir, *TINY, "--cache", "other.h5")
    assert not [line for line in lines(r.output) if line.startswith("extract ")]


def test_info_on_a_head_says_it_is_a_head(cli, kaggle_dir):
    """Item 4: `info --cache x.head.pt` advised deleting a good head."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    for args in (("info", "--cache", "cache/features.head.pt"), ("fit", "--cache", "cache/features.head.pt")):
        r = cli(*args, ok=False)
        assert r.exit_code == 1 and "--head" in r.output and "delete" not in r.output, r.output
    r = cli("info", "cache/features.head.pt", ok=False)
    assert "is a head" in r.output and str(Path("cache/features.h5").resolve()) in r.output.replace("\n", "")


def cats_only_head(cli, kaggle_dir, tmp_path) -> Path:
    """A head that calls everything a cat, and a labeled folder of cats only: no mistakes to show."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    head = Path("cache/features.head.pt")
    blob = torch.load(head, weights_only=True)
    blob["state_dict"]["linear.weight"].zero_()
    blob["state_dict"]["linear.bias"].copy_(torch.tensor([10.0, -10.0]))
    torch.save(blob, head)
    for i in range(3):
        draw(tmp_path / "cats" / f"cat.{i}.jpg", "cat", 700 + i)
    return tmp_path / "cats"


def test_preview_worst_without_mistakes_is_good_news(cli, kaggle_dir, tmp_path):
    cats = cats_only_head(cli, kaggle_dir, tmp_path)
    r = cli("preview", cats, "--worst", "4")
    assert "no mistakes among 3 images" in r.output and "error" not in r.output


def test_preview_note_only_on_the_heads_training_folder(cli, kaggle_dir, tmp_path):
    cats = cats_only_head(cli, kaggle_dir, tmp_path)
    r = cli("preview", cats)  # a new folder: every image is new, nothing to apologise for
    assert "no val images" not in r.output
    cli("fit", "--epochs", "1", "--val-fraction", "0", "--head", "all.head.pt")
    r = cli("preview", kaggle_dir, "--head", "all.head.pt")  # its training folder, with no validation split
    assert "no val images of the head's training here" in r.output


def test_interrupted_extract_is_said_by_info_and_fit(cli, kaggle_dir, monkeypatch):
    """Item 4: after Ctrl-C `info` showed "cat 4 (100%)" and fit failed without a word of the interruption."""
    import importlib

    ex = importlib.import_module("catdog_cache.extract.folder")  # the folder runner
    real = ex.run_features

    def one_batch_then_ctrl_c(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield batch
            raise KeyboardInterrupt

    monkeypatch.setattr(ex, "run_features", one_batch_then_ctrl_c)
    r = cli("extract", kaggle_dir, *TINY, "--batch-size", "4", "--workers", "0", ok=False)
    assert r.exit_code == 130
    source = str(kaggle_dir.resolve())
    info = json.loads(cli("info", "--json").output)
    assert info["cat"] == 4 and info["dog"] == 0 and info["incomplete"] == [source]
    assert "was interrupted" in cli("info").output  # (the test's own folder name holds "interrupted")
    r = cli("fit", ok=False)
    assert r.exit_code == 1 and "needs labeled cats and dogs" in r.output and "was interrupted" in r.output
    monkeypatch.setattr(ex, "run_features", real)
    cli("extract", kaggle_dir, *TINY)  # the rerun finishes the folder and clears the record
    info = json.loads(cli("info", "--json").output)
    assert info["incomplete"] == [] and info["dog"] == 6
    assert "was interrupted" not in cli("info").output


def test_predict_cache_of_other_features_is_worded_for_predict(cli, kaggle_dir, test_dir, tmp_path):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    other = tmp_path / "other.h5"
    cli("extract", test_dir, *TINY, "--views", "center,flip", "--cache", other)
    r = cli("predict", test_dir, "--cache", other, ok=False)
    assert r.exit_code == 1 and "the head" in r.output and "drop --cache" in r.output, r.output
    assert "this extract" not in r.output and "--backbone" not in r.output


def test_appending_takes_the_caches_settings(cli, kaggle_dir, folder_dir, tmp_path):
    """Item 5: `extract more/ --cache lite2.h5` without the flags was refused ("this extract has vgg16")."""
    cache = tmp_path / "c.h5"
    cli("extract", kaggle_dir, *TINY, "--views", "center,flip", "--dtype", "float16", "--cache", cache)
    cli("extract", folder_dir, "--cache", cache)  # no flags: the cache's own settings
    idx = read_index(cache)
    assert len(idx.sources) == 2 and idx.shape[1] == 2 and idx.dtype == "float16"
    r = cli("extract", folder_dir, "--cache", cache, "--dtype", "float32", ok=False)  # a contradiction: refused
    assert r.exit_code == 1 and "dtype" in r.output
    cli("extract", folder_dir, "--cache", cache, "--backbone", "tiny", "--views", "center,flip")  # agreeing flags
    assert json.loads(cli("info", cache, "--json").output) == json.loads(cli("info", "--cache", cache,
                                                                              "--json").output)


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
