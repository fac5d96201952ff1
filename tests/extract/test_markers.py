"""extract/markers.py: the one done-marker protocol, read as hostile input."""

from __future__ import annotations

import os
import threading

import pytest

from catdog_cache.errors import CacheError
from catdog_cache.extract.markers import Marker, markers_dir, read_marker, tar_identity, tar_unit, write_marker
from catdog_cache.sources.spec import Identity


def test_a_marker_reads_back_and_odd_ones_mean_not_done(tmp_path):
    cache = tmp_path / "c.h5"
    unit = tar_unit("/data/a.tar")
    marker = Marker(unit, tar_identity("/data/a.tar", Identity(10, "5"), "{}"), 3, 1, "tar", "/data/a.tar")
    write_marker(cache, marker)
    assert read_marker(cache, unit) == marker
    path = markers_dir(cache) / f"{unit}.json"
    good = path.read_text()
    for bad in ["{", "[]", good.replace('"rows": 3', '"rows": "3"'), good.replace('"part": ""', '"part": "../x"'),
                good.replace('"version": 1', '"version": 2'), good + " " * 70000]:
        path.write_text(bad)
        assert read_marker(cache, unit) is None, bad[:80]
    assert tar_identity("/data/a.tar", Identity(10, "6"), "{}") != marker.identity  # a touched tar is redone


def test_a_fifo_or_a_link_in_place_of_a_marker_is_not_read(tmp_path):
    """A FIFO would block an open for reading until a writer came: the run would hang on its own markers."""
    cache = tmp_path / "c.h5"
    markers_dir(cache).mkdir()
    os.mkfifo(markers_dir(cache) / "files-x-000000.json")
    result = []
    reader = threading.Thread(target=lambda: result.append(read_marker(cache, "files-x-000000")), daemon=True)
    reader.start()
    reader.join(10)
    assert result == [None]
    (tmp_path / "elsewhere.json").write_text('{"version": 1, "identity": "i", "part": "", "rows": 1, "failures": 0}')
    (markers_dir(cache) / "files-y-000000.json").symlink_to(tmp_path / "elsewhere.json")
    assert read_marker(cache, "files-y-000000") is None
    markers_dir(cache).rename(tmp_path / "moved")
    markers_dir(cache).symlink_to(tmp_path / "moved")
    with pytest.raises(CacheError, match="symbolic link"):
        write_marker(cache, Marker("files-x-000001", "i", 0, 0))
