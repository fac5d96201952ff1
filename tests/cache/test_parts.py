"""Cache parts assembled: exact names, later rows win, provenance, float16, damage, temp parts, one writer."""

import json
import os

import h5py
import numpy as np
import pytest

from catdog_cache.backbone import IMAGENET
from catdog_cache.cache import (
    SCHEMA_VERSION,
    Provenance,
    Rows,
    assemble,
    list_parts,
    locked,
    parts_dir,
    read_features,
    read_index,
    write_part,
)
from catdog_cache.errors import CacheBusy, CacheError, ProvenanceMismatch

PROV = Provenance("tiny", "fc7", "random:seed=0", IMAGENET.spec(), "center", "float32", "fp32")
ODD = ["a b.jpg", "ünï/çødé.jpg", "new\nline.jpg", os.fsdecode(b"raw\xff\xfe.jpg"), "x,y;\"q\".jpg"]


def rows_for(names, value):
    r = Rows()
    for i, n in enumerate(names):
        r.features.append(np.full((1, 4096), value + i, np.float32))
        r.paths.append(os.fsencode(n))
        r.labels.append(i % 2)
        r.sha256.append(f"{i:064x}")
    return r


def test_parts_assemble_sorted_with_exact_names(tmp_path):
    cache = tmp_path / "c.h5"
    write_part(cache, "p1", PROV, "/src", rows_for(ODD[:3], 10), {}, (1, 4096))
    write_part(cache, "p2", PROV, "/src", rows_for(ODD[3:], 20), {}, (1, 4096))
    idx = assemble(cache, PROV, {"torch": "x"})
    assert [os.fsdecode(p) for p in idx.paths] == sorted(ODD, key=os.fsencode)
    assert not parts_dir(cache).exists()
    feats = read_features(cache)
    assert feats.shape == (5, 4096) and feats.dtype == np.float32
    by_name = dict(zip(idx.paths, feats[:, 0], strict=True))
    assert by_name[os.fsencode(ODD[3])] == 20 and by_name[os.fsencode(ODD[0])] == 10
    with h5py.File(cache) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert json.loads(f.attrs["class_map"]) == {"cat": 0, "dog": 1}
        assert f["features"].chunks[0] <= 64


def test_later_part_replaces_row_and_failure_replaces_row(tmp_path):
    cache = tmp_path / "c.h5"
    write_part(cache, "p1", PROV, "/src", rows_for(["a.jpg", "b.jpg"], 1), {}, (1, 4096))
    assemble(cache, PROV, {})
    newer = rows_for(["a.jpg"], 7)
    newer.failed_paths.append(b"b.jpg")
    newer.failed_sha256.append("f" * 64)
    newer.failed_reasons.append("corrupt")
    write_part(cache, "p2", PROV, "/src", newer, {}, (1, 4096))
    idx = assemble(cache, PROV, {})
    assert idx.paths == [b"a.jpg"] and read_features(cache)[0, 0] == 7
    assert [(p, r) for _, p, _, r in idx.failed] == [(b"b.jpg", "corrupt")]


def test_provenance_mismatch_names_both_sides(tmp_path):
    cache = tmp_path / "c.h5"
    write_part(cache, "p1", PROV, "/src", rows_for(["a.jpg"], 1), {}, (1, 4096))
    assemble(cache, PROV, {})
    other = Provenance(**{**json.loads(PROV.to_json()), "weights": "imagenet:IMAGENET1K_V1"})
    write_part(cache, "p2", other, "/src", rows_for(["b.jpg"], 1), {}, (1, 4096))
    with pytest.raises(ProvenanceMismatch, match="random:seed=0.*imagenet:IMAGENET1K_V1"):
        assemble(cache, other, {})


def test_float16_halves_file(tmp_path):
    half = Provenance(**{**json.loads(PROV.to_json()), "dtype": "float16"})
    sizes = {}
    for prov in (PROV, half):
        cache = tmp_path / f"{prov.dtype}.h5"
        write_part(cache, "p", prov, "/s", rows_for([f"{i}.jpg" for i in range(64)], 0.5), {}, (1, 4096))
        assemble(cache, prov, {})
        sizes[prov.dtype] = cache.stat().st_size
        assert read_features(cache).dtype == np.float32
    assert sizes["float16"] < 0.6 * sizes["float32"]


def test_damaged_and_foreign_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "g.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CacheError, match="not a readable HDF5 cache"):
        read_index(garbage)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(CacheError, match="not a catdog-cache cache"):
        read_index(tmp_path / "other.h5")
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.attrs["schema_version"] = 99
        f["features"] = np.zeros((1, 1, 4096))
    with pytest.raises(CacheError, match="schema 99"):
        read_index(tmp_path / "old.h5")
    with pytest.raises(CacheError, match="run `catdog-cache extract"):
        read_index(tmp_path / "missing.h5")


def test_truncated_cache_is_clear_error(tmp_path):
    cache = tmp_path / "c.h5"
    write_part(cache, "p", PROV, "/s", rows_for(["a.jpg", "b.jpg"], 1), {}, (1, 4096))
    assemble(cache, PROV, {})
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError):
        read_features(cache)


def test_stale_tmp_part_is_discarded(tmp_path):
    cache = tmp_path / "c.h5"
    write_part(cache, "p", PROV, "/s", rows_for(["a.jpg"], 1), {}, (1, 4096))
    (parts_dir(cache) / "p9.h5.tmp").write_bytes(b"half a part")
    assert [p.name for p in list_parts(cache)] == ["p.h5"]
    assert not (parts_dir(cache) / "p9.h5.tmp").exists()


def test_second_writer_refused(tmp_path):
    cache = tmp_path / "c.h5"
    with locked(cache), pytest.raises(CacheBusy, match="in use"), locked(cache):
        pass
