"""A same-provenance shard put into a cache's shards folder is adopted by the next extract's finish, its rows and
labels with it; the run says so, naming it, instead of reporting "reused" alone (hardening round 4, item 7)."""

from __future__ import annotations

import shutil

from catdog_cache.cache import read_index, shards_dir
from tests.conftest import TINY, draw


def test_a_planted_shard_is_named_before_it_is_adopted(cli, tmp_path):
    for i in range(3):
        draw(tmp_path / "mine" / "cat" / f"{i}.jpg", "cat", i)
        draw(tmp_path / "theirs" / "dog" / f"{i}.jpg", "dog", 50 + i)
    mine, theirs = tmp_path / "mine.h5", tmp_path / "theirs.h5"
    cli("extract", tmp_path / "mine", "--cache", mine, *TINY)
    cli("extract", tmp_path / "theirs", "--cache", theirs, *TINY)
    planted = next(shards_dir(theirs).glob("*.h5"))
    shutil.copy(planted, shards_dir(mine) / planted.name)
    r = cli("extract", tmp_path / "mine", "--cache", mine, *TINY)
    assert "1 shard in" in r.output and "not listed in the index will be adopted" in r.output
    assert planted.name in r.output
    assert read_index(mine).shape[0] == 6  # adopted, as before: the warning is what changed
    again = cli("extract", tmp_path / "mine", "--cache", mine, *TINY)
    assert "adopted" not in again.output  # listed now: said once
