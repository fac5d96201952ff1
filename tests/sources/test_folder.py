"""sources/folder.py: a folder's samples and labels (Kaggle names, class folders), links, FIFOs, junk."""

import os

import pytest

from catdog_cache.errors import InputError
from catdog_cache.sources.folder import discover
from tests.conftest import draw


def test_kaggle_layout_labels_from_exact_prefix(tmp_path):
    for name in ["cat.1.jpg", "DOG.2.jpg", "dog.10.jpg", "hotdog.2.jpg", "concatenate.1.jpg", "cat_11.jpg"]:
        draw(tmp_path / "d" / name, "cat", 1)
    d = discover(tmp_path / "d")
    assert d.layout == "kaggle"
    assert [(s.rel, s.label) for s in d.samples] == [("DOG.2.jpg", 1), ("cat.1.jpg", 0), ("dog.10.jpg", 1)]
    assert {r for r, _ in d.skipped} == {"hotdog.2.jpg", "concatenate.1.jpg", "cat_11.jpg"}


def test_imagefolder_layout_case_insensitive_sorted(folder_dir):
    d = discover(folder_dir)
    assert d.layout == "imagefolder"
    assert [s.rel for s in d.samples] == sorted(s.rel for s in d.samples)
    assert {s.label for s in d.samples if s.rel.startswith("Cat/")} == {0}
    assert {s.label for s in d.samples if s.rel.startswith("dog/")} == {1}
    assert len(d.samples) == 10


def test_same_name_in_both_class_folders_kept(tmp_path):
    draw(tmp_path / "d" / "cat" / "1.jpg", "cat", 1)
    draw(tmp_path / "d" / "dog" / "1.jpg", "dog", 2)
    assert [(s.rel, s.label) for s in discover(tmp_path / "d").samples] == [("cat/1.jpg", 0), ("dog/1.jpg", 1)]


def test_any_class_folders_sorted_lower_case(tmp_path):
    """Class folders define the classes, sorted (ImageFolder), one per name in any case."""
    draw(tmp_path / "d" / "dog" / "1.jpg", "dog", 1)
    draw(tmp_path / "d" / "Bird" / "1.jpg", "cat", 1)
    draw(tmp_path / "d" / "ant" / "2.jpg", "cat", 2)
    d = discover(tmp_path / "d")
    assert d.classes == ("ant", "bird", "dog")
    assert [(s.rel, s.label) for s in d.samples] == [("Bird/1.jpg", 1), ("ant/2.jpg", 0), ("dog/1.jpg", 2)]


def test_cat_dog_subsets_keep_the_kaggle_ids(tmp_path):
    draw(tmp_path / "d" / "DOG" / "1.jpg", "dog", 1)
    d = discover(tmp_path / "d")
    assert d.classes == ("cat", "dog") and [s.label for s in d.samples] == [1]
    assert any("'cat' has no images" in w for w in d.warnings)


def test_parent_of_image_folders_is_refused(tmp_path):
    for split in ("train", "val"):
        draw(tmp_path / "d" / split / "cat" / "1.jpg", "cat", 1)
        draw(tmp_path / "d" / split / "dog" / "1.jpg", "dog", 1)
    with pytest.raises(InputError, match=r"sub-folders that are image folders themselves \(train, val\)"):
        discover(tmp_path / "d")


def test_too_many_classes_refused(tmp_path):
    for i in range(128):
        (tmp_path / "d" / f"c{i:03d}").mkdir(parents=True)
        (tmp_path / "d" / f"c{i:03d}" / "1.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="at most 127 classes"):
        discover(tmp_path / "d")


def test_top_level_images_keep_the_folder_unlabeled(tmp_path):
    draw(tmp_path / "d" / "1.jpg", "cat", 1)
    draw(tmp_path / "d" / "extra" / "2.jpg", "cat", 2)
    d = discover(tmp_path / "d")
    assert d.layout == "unlabeled" and d.classes == () and [s.rel for s in d.samples] == ["1.jpg"]
    assert any("extra" in w for w in d.warnings)


def test_unlabeled_and_junk(tmp_path):
    root = tmp_path / "d"
    draw(root / "1.jpg", "cat", 1)
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "._1.jpg").write_bytes(b"junk")
    (root / "__MACOSX").mkdir()
    draw(root / "__MACOSX" / "2.jpg", "cat", 1)
    d = discover(root)
    assert d.layout == "unlabeled" and [s.rel for s in d.samples] == ["1.jpg"]


def test_symlink_loop_and_fifo_do_not_hang(tmp_path):
    root = tmp_path / "d"
    draw(root / "cat" / "1.jpg", "cat", 1)
    os.symlink(root, root / "cat" / "loop")
    os.mkfifo(root / "cat" / "pipe.jpg")
    d = discover(root)
    assert [s.rel for s in d.samples] == ["cat/1.jpg"]
    reasons = dict(d.skipped)
    assert "not a regular file" in reasons["cat/pipe.jpg"]


@pytest.mark.parametrize("make", ["missing", "file"])
def test_missing_folder_is_input_error(tmp_path, make):
    target = tmp_path / "nope"
    if make == "file":
        target.write_text("x")
    with pytest.raises(InputError, match="nope"):
        discover(target)


def test_symlink_to_file_and_hard_link_counted_once(tmp_path):
    root = tmp_path / "d"
    real = draw(root / "cat" / "b.jpg", "cat", 1)
    os.symlink(real, root / "cat" / "a.jpg")
    os.link(real, root / "cat" / "c.jpg")
    d = discover(root)
    assert [s.rel for s in d.samples] == ["cat/b.jpg"]
    assert {r for r, _ in d.skipped} == {"cat/a.jpg", "cat/c.jpg"}


def test_non_image_suffixes_ignored_and_unknown_sniffed_later(tmp_path):
    root = tmp_path / "d"
    draw(root / "cat" / "1.jpg", "cat", 1)
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "cat" / "labels.csv").write_text("a,b")
    (root / "cat" / "noext").write_bytes((root / "cat" / "1.jpg").read_bytes())
    assert [s.rel for s in discover(root).samples] == ["cat/1.jpg", "cat/noext"]


def test_dangling_symlink_reported(tmp_path):
    root = tmp_path / "d"
    draw(root / "1.jpg", "cat", 1)
    os.symlink(tmp_path / "gone.jpg", root / "2.jpg")
    d = discover(root)
    assert [s.rel for s in d.samples] == ["1.jpg"] and "unreadable" in dict(d.skipped)["2.jpg"]


def test_hard_linked_duplicate_keeps_the_first_name_whatever_the_walk_order(tmp_path):
    from catdog_cache.sources.folder import discover

    root = tmp_path / "d"
    draw(root / "cat" / "a.jpg", "cat", 1)
    (root / "dog").mkdir()
    os.link(root / "cat" / "a.jpg", root / "dog" / "b.jpg")
    d = discover(root)
    assert [(s.rel, s.label) for s in d.samples] == [("cat/a.jpg", 0)]
    assert ("dog/b.jpg", "same file as cat/a.jpg") in d.skipped


def test_kaggle_labels_by_bisect_follow_the_per_name_rule():
    from catdog_cache.sources.folder import _kaggle_label, _kaggle_labels

    names = sorted(["cat.1.jpg", "cat.", "cat", "Cat.2.jpg", "CAT.3.png", "dog.4.jpg", "DoG.5.jpg", "dog", "dogs.6.jpg",
                    "cat_7.jpg", "hotdog.8.jpg", "a.jpg", "z.jpg", "cat-9.jpg", "catdog.10.jpg", "dog..jpg", "c.jpg"])
    assert _kaggle_labels(names).tolist() == [_kaggle_label(n) for n in names]
    assert _kaggle_labels([]).tolist() == []


def test_kaggle_folder_labels_any_case_and_skips_the_rest(tmp_path):
    root = tmp_path / "k"
    for name in ["cat.1.jpg", "CAT.2.jpg", "Dog.3.jpg", "dog.4.jpg", "cat_5.jpg", "hotdog.6.jpg"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    d = discover(root)
    assert d.layout == "kaggle" and [(s.rel, s.label) for s in d.samples] == [
        ("CAT.2.jpg", 0), ("Dog.3.jpg", 1), ("cat.1.jpg", 0), ("dog.4.jpg", 1)]
    assert d.rels == [s.rel for s in d.samples] and d.labels.tolist() == [0, 1, 0, 1] and d.stat.shape == (4, 5)
    assert sorted(r for r, _ in d.skipped) == ["cat_5.jpg", "hotdog.6.jpg"]
    assert [(s.rel, s.label) for s in d.pick([3, 0])] == [("dog.4.jpg", 1), ("CAT.2.jpg", 0)]


@pytest.mark.parametrize("inside", [["CAT/x.jpg", "Dog/y.jpg"], ["Cat.1.jpg", "dog.2.jpg"]])
def test_a_class_folder_that_is_a_dataset_in_any_case_is_refused(tmp_path, inside):
    root = tmp_path / "p"
    for rel in ["other/z.jpg"] + [f"train/{r}" for r in inside]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    with pytest.raises(InputError, match="image folders themselves"):
        discover(root)


def test_folders_named_like_kaggle_files_are_classes_contents(tmp_path):
    """`cat.x/` and `dog.y/` inside a class folder are folders, not Kaggle files: the class folder is a class."""
    root = tmp_path / "p"
    for rel in ["a/cat.x/1.jpg", "a/dog.y/2.jpg", "b/3.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    d = discover(root)
    assert d.layout == "imagefolder" and [(s.rel, s.label) for s in d.samples] == [
        ("a/cat.x/1.jpg", 0), ("a/dog.y/2.jpg", 0), ("b/3.jpg", 1)]


def test_symlink_and_real_name_of_one_file_keep_the_real_one_in_any_walk_order(tmp_path):
    root = tmp_path / "d"
    draw(root / "z.jpg", "cat", 1)
    os.symlink(root / "z.jpg", root / "a.jpg")  # sorts first, but a link: the real name is kept
    d = discover(root)
    assert [s.rel for s in d.samples] == ["z.jpg"] and ("a.jpg", "same file as z.jpg") in d.skipped


def test_kaggle_prefix_any_case(cli, tmp_path):
    root = tmp_path / "k"
    draw(root / "Cat.1.jpg", "cat", 1)
    draw(root / "DOG.2.jpg", "dog", 2)
    draw(root / "hotdog.3.jpg", "dog", 3)
    from catdog_cache.sources.folder import discover

    d = discover(root)
    assert {s.rel: s.label for s in d.samples} == {"Cat.1.jpg": 0, "DOG.2.jpg": 1}
