"""Seams between merged features, found by running the whole job as a new user (review after the merges)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TINY


def test_strict_refuses_a_failure_recorded_by_an_earlier_run(cli, kaggle_dir):
    """Resume counts a recorded failure as known, so a later --strict run on the same cache said 'failed 0' and
    exited 0 although an unusable file is still in the folder."""
    (kaggle_dir / "cat.50.jpg").write_bytes(b"not an image at all")
    cli("extract", kaggle_dir, *TINY)  # records the failure
    r = cli("extract", kaggle_dir, "--strict", ok=False)
    assert r.exit_code == 1 and "--strict" in r.output and "cat.50.jpg" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    (kaggle_dir / "cat.50.jpg").unlink()  # fixed by the user: --strict passes again
    r = cli("extract", kaggle_dir, "--strict")
    assert r.exit_code == 0, r.output


def test_refit_removes_pictures_that_describe_the_old_head(cli, kaggle_dir):
    """A refit without --folds/--calibrate left the previous head's fold curves and reliability diagram beside the
    new head, where they read as this head's."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "2", "--folds", "2", "--calibrate")
    folds, reliability = Path("cache/features.head.folds.png"), Path("cache/features.head.reliability.png")
    assert folds.exists() and reliability.exists()
    cli("fit", "--epochs", "2")
    assert Path("cache/features.head.png").exists()
    assert not folds.exists() and not reliability.exists()


def test_index_known_is_the_one_answer_to_which_files_are_known(cli, kaggle_dir, folder_dir):
    """extract's plan, predict's up-to-date check and scoring from a training cache share Index.known."""
    from catdog_cache.cache import read_index

    (kaggle_dir / "cat.50.jpg").write_bytes(b"not an image at all")
    cli("extract", kaggle_dir, *TINY)
    cli("extract", folder_dir)
    idx = read_index("cache/features.h5")
    known = idx.known(str(kaggle_dir.resolve()))
    assert {p.decode() for p in known} == {f"{k}.{i}.jpg" for k in ("cat", "dog") for i in range(6)} | {"cat.50.jpg"}
    assert len(idx.known(str(folder_dir.resolve()))) == 10 and idx.known("/elsewhere") == {}
