"""`catdog-cache export-features` (issue 31, item 12): a cache's rows to .npz (NumPy) or .parquet (pandas), equal to
what the library's own reader gives, written a block of rows at a time. Before, there was no such command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from catdog_cache.cache import export as export_mod
from catdog_cache.cache import open_cache, read_features
from catdog_cache.cache.view import View
from tests.conftest import TINY, draw, lines


def library_rows(cache: Path):
    with open_cache(cache) as (_, idx):
        return idx, read_features(cache, view=None)  # [N, V, D]


@pytest.fixture
def two_folder_cache(cli, kaggle_dir, test_dir, tmp_path) -> Path:
    """Two sources, the second unlabeled, and a file name that is not UTF-8 (any name round-trips)."""
    draw(test_dir / os.fsdecode(b"\xff-odd.jpg"), "cat", 77)
    cache = tmp_path / "c" / "feats.h5"
    cli("extract", kaggle_dir, *TINY, "--cache", cache)
    cli("extract", test_dir, "--cache", cache)
    return cache


def test_npz_rows_equal_the_cache(cli, two_folder_cache, tmp_path):
    out = tmp_path / "x.npz"
    r = cli("export-features", "--cache", two_folder_cache, "--out", out)
    assert len(lines(r.output)) == 1 and "exported 17 rows" in r.output, r.output
    idx, x = library_rows(two_folder_cache)
    with np.load(out) as d:  # no allow_pickle: every member is a plain array
        assert d["features"].shape == (17, 4096) and d["features"].dtype == np.float32
        np.testing.assert_array_equal(d["features"], x[:, 0])
        np.testing.assert_array_equal(d["labels"], idx.labels)
        assert (d["labels"] == -1).sum() == 5  # the unlabeled folder
        assert [os.fsencode(p) for p in d["paths"]] == idx.paths and b"\xff-odd.jpg" in idx.paths
        np.testing.assert_array_equal(d["source"], idx.source)
        assert d["sources"].tolist() == idx.sources and d["classes"].tolist() == idx.classes == ["cat", "dog"]
        assert json.loads(str(d["provenance"]))["arch"] == "tiny"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".x.npz")]  # no temp file left


def test_every_view_and_blocks_of_rows(cli, kaggle_dir, tmp_path, monkeypatch):
    """Several views: `features` is the first, `features_<view>` each other. Features are read a block at a time
    (never all rows at once); the blocks here are 4 rows."""
    cache = tmp_path / "views.h5"
    cli("extract", kaggle_dir, *TINY, "--views", "center,flip", "--cache", cache)
    monkeypatch.setattr(export_mod, "CHUNK_ROWS", 4)
    seen: list[int] = []
    real = View.read

    def spy(self, lo, hi, *a, **k):
        seen.append(min(hi, self.rows) - lo)
        return real(self, lo, hi, *a, **k)

    monkeypatch.setattr(View, "read", spy)
    done = export_mod.export_features(cache, tmp_path / "v.npz", block_bytes=1)
    monkeypatch.undo()
    assert done.arrays[:2] == ["features", "features_flip"] and max(seen) == 4 and len(seen) == 2 * 3
    idx, x = library_rows(cache)
    with np.load(tmp_path / "v.npz") as d:
        np.testing.assert_array_equal(d["features"], x[:, 0])
        np.testing.assert_array_equal(d["features_flip"], x[:, 1])
        assert [p.encode() for p in d["paths"]] == idx.paths


def test_parquet_rows_equal_the_cache(cli, two_folder_cache, tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet export needs pyarrow, not installed here (the npz tests run)")
    pd = pytest.importorskip("pandas", reason="reading the Parquet file back uses pandas")
    out = tmp_path / "x.parquet"
    cli("export-features", "--cache", two_folder_cache, "--out", out)
    idx, x = library_rows(two_folder_cache)
    df = pd.read_parquet(out)
    assert list(df.columns) == ["features", "label", "class", "path", "source"]
    np.testing.assert_array_equal(np.stack(df["features"]), x[:, 0])
    np.testing.assert_array_equal(df["label"].to_numpy(), idx.labels)
    assert df["class"].isna().sum() == 5 and set(df["class"].dropna()) == {"cat", "dog"}
    assert list(df["path"]) == idx.paths  # a name that is not UTF-8: the column holds bytes
    assert list(df["source"].astype(str)) == [idx.sources[s] for s in idx.source]


def test_parquet_without_pyarrow_is_one_line(cli, two_folder_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    r = cli("export-features", "--cache", two_folder_cache, "--out", tmp_path / "x.parquet", ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    assert "pip install 'catdog-cache[parquet]'" in r.output, r.output
    assert not list(tmp_path.glob("*x.parquet*"))


@pytest.mark.parametrize("name, says", [("x.csv", ".npz (NumPy) or .parquet"), ("folder.npz", "is a folder")])
def test_bad_out_is_one_line(cli, two_folder_cache, tmp_path, name, says):
    out = tmp_path / name
    if name == "folder.npz":
        out.mkdir()
    r = cli("export-features", "--cache", two_folder_cache, "--out", out, ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1 and "--out" in r.output and says in r.output, r.output
    assert not out.is_file()
