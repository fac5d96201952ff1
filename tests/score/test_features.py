"""The features scoring reads: a training cache never added to, the rest extracted apart, as predict."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from catdog_cache.cache import read_index
from tests.conftest import TINY, draw, lines


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


def test_predict_cache_of_other_features_is_worded_for_predict(cli, kaggle_dir, test_dir, tmp_path):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    other = tmp_path / "other.h5"
    cli("extract", test_dir, *TINY, "--views", "center,flip", "--cache", other)
    r = cli("predict", test_dir, "--cache", other, ok=False)
    assert r.exit_code == 1 and "the head" in r.output and "drop --cache" in r.output, r.output
    assert "this extract" not in r.output and "--backbone" not in r.output


def test_weights_file_path_is_remembered(cli, kaggle_dir, tmp_path):
    from torchvision.models import get_model

    torch.manual_seed(0)
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), tmp_path / "m.pth")
    cli("extract", kaggle_dir, "--backbone", "mobilenet_v3_small", "--weights", tmp_path / "m.pth")
    cli("fit", "--epochs", "1")
    cli("predict", kaggle_dir)  # no --weights: the recorded path, its sha256 still matching
    (tmp_path / "m.pth").rename(tmp_path / "moved.pth")
    cli("predict", kaggle_dir)  # every feature cached: the file is not needed
    draw(kaggle_dir / "cat.40.jpg", "cat", 40)  # a new image: the backbone must run again (in a cache apart: scoring
    apart = tmp_path / "apart.h5"  # never adds to the training cache)
    r = cli("predict", kaggle_dir, "--cache", apart, ok=False)
    assert r.exit_code == 1 and "pass the same file with --weights" in r.output and "m.pth" in r.output
    cli("predict", kaggle_dir, "--cache", apart, "--weights", tmp_path / "moved.pth")


def test_progress_is_labelled_by_the_command(cli, kaggle_dir, test_dir):
    from catdog_cache.score.predict import predict

    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    stages = []
    predict(test_dir, "cache/features.head.pt", "p.csv", progress=lambda s, d, t: stages.append(s))
    assert "predict" in stages and "extract" not in stages
