"""Scoring takes every input extract takes (tar shards as well as folders), through extract's one planner."""

from __future__ import annotations

import os
from pathlib import Path

from catdog_cache.files import same_file


def test_same_file_follows_links_and_never_raises(tmp_path: Path) -> None:
    a = tmp_path / "a.h5"
    a.write_bytes(b"x")
    os.link(a, tmp_path / "hard.h5")
    (tmp_path / "soft.h5").symlink_to(a)
    assert same_file(a, tmp_path / "hard.h5") and same_file(tmp_path / "soft.h5", a)
    assert same_file(tmp_path / "sub" / ".." / "a.h5", a)  # spelled another way, even through a missing folder
    (tmp_path / "other.h5").write_bytes(b"x")
    assert not same_file(a, tmp_path / "other.h5") and not same_file(a, tmp_path / "missing.h5")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert not same_file(tmp_path / "loop1", a) and not same_file(a, tmp_path / "loop2")
