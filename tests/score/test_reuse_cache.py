"""predict reuses features a cache already holds (issue 31, item 10): a head moved to another folder re-extracted
every photo that an identical cache held. A cache that holds the input unchanged with the head's features is read,
never written: no image extracted, its files byte-identical with unchanged mtimes, no lock made."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tests.conftest import TINY, draw


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under a folder: its sha256 and mtime_ns (a write, even of the same bytes, changes the mtime)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def predicted(cli, *args) -> dict:
    return json.loads(cli("predict", *args, "--out", "p.csv", "--json").output)


def test_copied_head_reads_the_cache_named_with_cache(cli, kaggle_dir, test_dir, tmp_path):
    """The brief's case: extract into A, fit, the head copied elsewhere, predict with --cache A."""
    cli("extract", kaggle_dir, *TINY, "--cache", tmp_path / "a" / "A.h5")
    cli("extract", test_dir, *TINY, "--cache", tmp_path / "a" / "B.h5")
    cli("fit", "--cache", tmp_path / "a" / "A.h5", "--head", tmp_path / "h" / "head.pt", "--epochs", "1")
    (tmp_path / "elsewhere").mkdir()
    head = Path(shutil.copy(tmp_path / "h" / "head.pt", tmp_path / "elsewhere" / "head.pt"))
    before = snapshot(tmp_path / "a")
    for folder, cache in ((kaggle_dir, "A.h5"), (test_dir, "B.h5")):  # the training cache, and a test cache
        out = predicted(cli, folder, "--head", head, "--cache", tmp_path / "a" / cache)
        assert out["extracted"] == 0 and out["rows"] == len(list(folder.iterdir())), out
    assert snapshot(tmp_path / "a") == before
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["head.pt"]  # no cache made beside it


def test_moved_head_reads_the_default_cache_of_its_old_place(cli, kaggle_dir, test_dir, tmp_path):
    """The user's case: the default flow (the head beside its training cache, the test features beside the head),
    then the head moved to another folder: the test features its old place cached are read, not extracted again.
    The old code extracted all of them into a new cache beside the moved head."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    first = predicted(cli, test_dir)
    assert first["extracted"] == 4
    old_default, scores = Path(first["cache"][0]), Path("p.csv").read_text()
    (tmp_path / "models").mkdir()
    head = Path("cache/features.head.pt").rename(tmp_path / "models" / "head.pt")
    before = snapshot(Path("cache"))
    out = predicted(cli, test_dir, "--head", head)
    assert out["extracted"] == 0, out
    assert Path(out["cache"][0]).resolve() == old_default.resolve()
    assert snapshot(Path("cache")) == before  # read only: same bytes, same mtimes, no lock file
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["head.pt"]
    assert Path("p.csv").read_text() == scores  # the same features, the same head: the same CSV


def test_a_stale_cache_of_the_old_place_is_never_added_to(cli, kaggle_dir, test_dir, tmp_path):
    """That cache is only read when it holds the input unchanged: a changed photo is extracted beside the moved head
    (as before), and the old place's cache is left as it was."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    predicted(cli, test_dir)
    (tmp_path / "models").mkdir()
    head = Path("cache/features.head.pt").rename(tmp_path / "models" / "head.pt")
    draw(test_dir / "1.jpg", "dog", 999)  # other pixels under the same name
    before = snapshot(Path("cache"))
    out = predicted(cli, test_dir, "--head", head)
    assert out["extracted"] == 4 and Path(out["cache"][0]).parent == tmp_path / "models", out
    assert snapshot(Path("cache")) == before


def test_moved_head_reads_the_default_cache_beside_where_fit_saved_it(cli, kaggle_dir, test_dir, tmp_path):
    """A head saved apart from its training cache (fit --head): its old folder is recorded, so a move still finds the
    test features predict cached beside it there."""
    cli("extract", kaggle_dir, *TINY, "--cache", tmp_path / "c" / "train.h5")
    cli("fit", "--cache", tmp_path / "c" / "train.h5", "--head", tmp_path / "h" / "head.pt", "--epochs", "1")
    assert predicted(cli, test_dir, "--head", tmp_path / "h" / "head.pt")["extracted"] == 4
    (tmp_path / "m").mkdir()
    head = (tmp_path / "h" / "head.pt").rename(tmp_path / "m" / "head.pt")
    before = snapshot(tmp_path / "h")
    out = predicted(cli, test_dir, "--head", head)
    assert out["extracted"] == 0 and Path(out["cache"][0]).parent == tmp_path / "h", out
    assert snapshot(tmp_path / "h") == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["head.pt"]
