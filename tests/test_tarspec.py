"""Tar-shard input as a new user meets it: empty tars, missing shards, listing comments, the source limit, Ctrl-C's
incomplete marks and the messages' counts."""

from __future__ import annotations

import tarfile

import pytest

from catdog_cache.errors import InputError
from catdog_cache.extract import extract
from tests.conftest import TINY
from tests.test_tars import CFG, images, jpeg, make_tar  # noqa: F401 (images: a fixture)


def test_empty_tar_and_tar_without_images_are_one_line(cli, tmp_path):
    empty = tmp_path / "e.tar"
    with tarfile.open(empty, "w"):
        pass
    result = cli("extract", empty, "--cache", tmp_path / "m" / "f.h5", *TINY, "--workers", "0", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output and "no images in" in result.output
    assert not (tmp_path / "m" / "f.h5").exists()
    other = make_tar(tmp_path / "t.tar", [("notes.txt", b"hi"), ("README", b"x")])
    with pytest.raises(InputError, match=r"no images in .*t\.tar: .*1 sample of other files, first '.*#notes'"):
        extract(other, tmp_path / "g.h5", CFG)
    # into a cache that has rows already: still refused, and again on a rerun (the empty shard's marker is reused)
    cache = tmp_path / "c.h5"
    extract(make_tar(tmp_path / "a.tar", [("cat.1.jpg", jpeg("cat", 1, tmp_path / "d"))]), cache, CFG)
    for _ in range(2):
        with pytest.raises(InputError, match="no images in"):
            extract(empty, cache, CFG)
