"""A folder's layout read as a new user's data sets have it (issue 31, items 1 and 2): a tutorial's train/ + val/
is a split data set, not two classes; a photo moved into its right class folder keeps its class."""

from __future__ import annotations

import pytest

from catdog_cache.errors import InputError
from catdog_cache.sources.folder import discover
from tests.conftest import draw


def test_train_and_val_holding_class_folders_are_refused_in_one_line(tmp_path, cli):
    """hymenoptera_data/: train/{ants,bees}, val/{ants,bees}. It was read as two classes, train and val, and fit
    trained "train vs val"."""
    data = tmp_path / "hymenoptera_data"
    for split in ("train", "val"):
        for k, kind in enumerate(("ants", "bees")):
            draw(data / split / kind / "0.jpg", "cat" if k else "dog", k)
    with pytest.raises(InputError, match="split data set") as e:
        discover(data)
    assert "train/ holds ants, bees" in str(e.value) and str(data / "train") in str(e.value)
    r = cli("extract", data, "--backbone", "tiny", "--weights", "random", ok=False)
    assert r.exit_code == 1 and "split data set" in r.output and "Traceback" not in r.output
    assert discover(data / "train").classes == ("ants", "bees")  # the suggested folder reads as classes


def test_folders_sharing_their_inner_folders_are_splits_too(tmp_path):
    data = tmp_path / "d"
    for split in ("2023", "2024"):
        for k, kind in enumerate(("ants", "bees")):
            draw(data / split / kind / "0.jpg", "cat" if k else "dog", k)
    with pytest.raises(InputError, match="split data set"):
        discover(data)


def test_classes_with_images_in_sub_folders_stay_classes(tmp_path):
    """One shared inner name (a year, a camera) does not make classes into splits; nor does anything inside cat/."""
    data = tmp_path / "d"
    draw(data / "ants" / "2023" / "0.jpg", "cat", 0)
    draw(data / "bees" / "2023" / "0.jpg", "dog", 1)
    assert discover(data).classes == ("ants", "bees")
    kaggle = tmp_path / "k"
    for kind in ("cat", "dog"):
        for split in ("train", "val"):
            draw(kaggle / kind / split / "0.jpg", kind, 3)
    assert discover(kaggle).classes == ("cat", "dog")


def test_a_kaggle_named_photo_in_its_right_class_folder_keeps_that_class(tmp_path):
    """dog/cat.3000.jpg: a photo moved into its right folder while cleaning the data set. The folder was refused as
    a nested data set ("sub-folders that are image folders themselves (dog)")."""
    data = tmp_path / "d"
    for i in range(2):
        draw(data / "cat" / f"cat.{i}.jpg", "cat", i)
        draw(data / "dog" / f"dog.{i}.jpg", "dog", 10 + i)
    draw(data / "dog" / "cat.3000.jpg", "dog", 99)
    disc = discover(data)
    label = dict(zip(disc.rels, disc.labels.tolist(), strict=True))
    assert disc.classes == ("cat", "dog") and label["dog/cat.3000.jpg"] == 1
    nested = tmp_path / "n"  # a Kaggle folder inside an unrelated one is still a nested data set
    draw(nested / "train" / "cat.0.jpg", "cat", 0)
    draw(nested / "train" / "dog.0.jpg", "dog", 1)
    draw(nested / "other" / "x.jpg", "cat", 2)
    with pytest.raises(InputError, match="image folders themselves"):
        discover(nested)
