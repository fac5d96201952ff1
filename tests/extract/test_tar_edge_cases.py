"""Tar-shard input as a new user meets it: empty tars, missing shards, listing comments, the source limit, Ctrl-C's
incomplete marks and the messages' counts."""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile

import pytest

from catdog_cache.cache import read_index, shards_dir
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import InputError
from catdog_cache.extract.markers import markers_dir
from catdog_cache.extract.tars import extract_tars
from catdog_cache.sources.spec import resolve_inputs
from tests.conftest import TINY, jpeg
from tests.extract.test_tars import CFG, make_tar, slow_extract


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


def test_missing_local_shards_refused_before_any_work(cli, tmp_path, images, opened):
    names = sorted(images)
    cache = tmp_path / "c.h5"
    make_tar(tmp_path / "s" / "train-000000.tar", [(n, images[n]) for n in names[:4]])
    extract(tmp_path / "s" / "train-000000.tar", cache, CFG)
    before, opened[:] = cache.read_bytes(), []
    pattern = tmp_path / "shard" / "train-{000000..000003}.tar"  # a typo: shard/, not s/
    result = cli("extract", pattern, "--cache", cache, *TINY, "--workers", "0", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert "4 of 4 shards not found:" in line and "train-000000.tar" in line and "and 1 more" in line
    assert "quote a brace pattern" in line and opened == [] and cache.read_bytes() == before
    # a listing naming one missing shard, into a new cache: refused too, nothing written
    make_tar(tmp_path / "s" / "train-000001.tar", [(n, images[n]) for n in names[4:]])
    listing = tmp_path / "list.txt"
    listing.write_text("s/train-000000.tar\ns/train-000001.tar\ns/train-000002.tar\n")
    with pytest.raises(InputError, match=r"1 of 3 shards not found: .*train-000002\.tar; nothing was extracted"):
        extract(listing, tmp_path / "new.h5", CFG)
    assert not (tmp_path / "new.h5").exists() and not markers_dir(tmp_path / "new.h5").exists() and opened == []


def test_unreadable_remote_shard_saves_the_others_and_exits_nonzero(cli, tmp_path, images, opened):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/bkt/x-0.tar", make_tar(tmp_path / "x.tar", sorted(images.items())).read_bytes())
    try:
        for cache in (tmp_path / "new.h5", tmp_path / "new.h5", tmp_path / "other.h5"):  # new, then existing
            result = cli("extract", "memory://bkt/x-{0..1}.tar", "--cache", cache, *TINY, "--workers", "0", ok=False)
            line = " ".join(result.output.split())
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert "1 of 2 shards could not be read, first memory://bkt/x-1.tar" in line
            assert "(8 rows in" in line and "run extract again" in line
            assert read_index(cache).shape[0] == 8
        assert opened.count("memory://bkt/x-0.tar") == 2  # the rerun into new.h5 skipped the shard it had read
        with pytest.raises(InputError, match=r"nothing could be read from memory://bkt/y-\{0\.\.1\}\.tar"):
            extract("memory://bkt/y-{0..1}.tar", tmp_path / "none.h5", CFG)
        assert not (tmp_path / "none.h5").exists()
    finally:
        fs.rm("/bkt", recursive=True)


def test_listing_trailing_comments_are_stripped(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\na.tar  # the cats\nb.tar\t# tab\nhttps://h/c.tar#frag\n  # indented\n")
    assert resolve_inputs(listing) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), "https://h/c.tar#frag"]


def test_more_sources_than_a_cache_holds_refused_before_any_work(tmp_path, images, opened, monkeypatch):
    from catdog_cache.extract import plan as tarextract

    monkeypatch.setattr(tarextract, "MAX_SOURCES", 3, raising=False)  # 65,535 in earnest
    names = sorted(images)
    for k in range(4):
        make_tar(tmp_path / f"s-{k}.tar", [(n, images[n]) for n in names[2 * k:2 * k + 2]])
    with pytest.raises(InputError, match=r"would hold 4 sources \(0 already, 4 new shards\); a cache holds at most 3"):
        extract(str(tmp_path / "s-{0..3}.tar"), tmp_path / "new.h5", CFG)
    assert opened == [] and not (tmp_path / "new.h5").exists()
    cache = tmp_path / "c.h5"
    extract(str(tmp_path / "s-{0..1}.tar"), cache, CFG)
    before, opened[:] = cache.read_bytes(), []
    extract(str(tmp_path / "s-{1..2}.tar"), cache, CFG)  # 3 sources: s-1 is one already
    with pytest.raises(InputError, match=r"would hold 4 sources \(3 already, 1 new shard\)"):
        extract(str(tmp_path / "s-{0..3}.tar"), cache, CFG)
    assert opened == [str(tmp_path / "s-2.tar")]
    assert read_index(cache).shape[0] == 6 and before != cache.read_bytes()


def test_ctrl_c_marks_only_unfinished_shards_incomplete(tmp_path, images):
    names = sorted(images)
    shards = [str(make_tar(tmp_path / f"s-{k}.tar", [(n, images[n]) for n in names[2 * k:2 * k + 2]]))
              for k in range(4)]
    cache = tmp_path / "c.h5"
    proc = slow_extract(str(tmp_path / "s-{0..3}.tar"), cache, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted: finished shards saved" in err
    done = {json.loads(m.read_text())["source"] for m in markers_dir(cache).glob("*.json")}
    assert 1 <= len(done) < 4
    assert read_index(cache).incomplete == sorted(set(shards) - done)
    extract(str(tmp_path / "s-{0..3}.tar"), cache, CFG)  # the rerun finishes them and clears the marks
    assert read_index(cache).incomplete == [] and read_index(cache).shape[0] == 8


def test_counts_of_one_read_singular(tmp_path, images):
    shard = make_tar(tmp_path / "a.tar", [("cat.1.jpg", images["cat.1.jpg"]), ("dog.2.jpg", b"not a jpeg")])
    with pytest.raises(InputError, match=r"^--strict: 1 file could not be decoded, first '.*dog\.2'"):
        extract(shard, tmp_path / "c.h5", CFG, strict=True)
    with pytest.raises(InputError, match=r"^1 of 1 shard not found"):
        extract_tars([str(tmp_path / "gone.tar")], tmp_path / "c.h5", CFG)


def test_moved_single_file_cache_needs_its_inputs_folder(cli, tmp_path, images, opened):
    """docs/cache.md: compact --single leaves the done markers in <cache>.inputs/; moved along, nothing is re-read."""
    names = sorted(images)
    for k in range(2):
        make_tar(tmp_path / f"s-{k}.tar", [(n, images[n]) for n in names[4 * k:4 * k + 4]])
    pattern, cache = str(tmp_path / "s-{0..1}.tar"), tmp_path / "c.h5"
    extract(pattern, cache, CFG)
    extract(make_tar(tmp_path / "more.tar", [("x/cat.9.jpg", images["cat.0.jpg"])]), cache, CFG)  # two shards
    cli("compact", "--cache", cache, "--single")
    assert not shards_dir(cache).exists()  # one file...
    (tmp_path / "moved").mkdir()
    cache.rename(tmp_path / "moved" / "d.h5")
    markers_dir(cache).rename(markers_dir(tmp_path / "moved" / "d.h5"))
    opened.clear()
    assert extract(pattern, tmp_path / "moved" / "d.h5", CFG).reused == 8 and opened == []
    cache = tmp_path / "moved" / "d.h5"
    cache.rename(tmp_path / "e.h5")  # without its markers: every shard is read again, rows replaced
    r = extract(pattern, tmp_path / "e.h5", CFG)
    assert (r.extracted, r.rows, len(opened)) == (8, 9, 2)


def test_tar_markers_of_the_old_layout_still_count(tmp_path, images, opened):
    """Caches made before the one marker protocol kept tar markers in <cache>.inputs/<digest>.json with fields of
    their own: a rerun reads them (extract.markers.legacy_tar_marker); a damaged one means redo. They have no
    digest of the rows they vouch for: each tar is read once and hashed, not decoded (markers.verify_tar_marker),
    and the marker upgraded into <cache>.done/, so the next run opens none."""
    from catdog_cache.extract.markers import legacy_tar_dir, source_digest
    from catdog_cache.sources.spec import identity

    names = sorted(images)
    tars = [make_tar(tmp_path / f"s-{k}.tar", [(n, images[n]) for n in names[4 * k:4 * k + 4]]) for k in range(2)]
    pattern, cache = str(tmp_path / "s-{0..1}.tar"), tmp_path / "c.h5"
    extract(pattern, cache, CFG)
    legacy = legacy_tar_dir(cache)
    legacy.mkdir()
    for marker in markers_dir(cache).glob("tar-*.json"):
        new = json.loads(marker.read_text())
        ident = identity(new["source"])
        (legacy / f"{source_digest(new['source'])[:40]}.json").write_text(json.dumps(
            {"source": new["source"], "size": ident.size, "version": ident.version,
             "provenance": CFG.provenance().to_json(), "rows": new["rows"], "failed": new["failures"]}))
        marker.unlink()
    first = legacy / f"{source_digest(str(tars[0]))[:40]}.json"
    first.write_text(first.read_text().replace('"rows"', '"rowz"'))  # damaged: that tar is read again
    opened.clear()
    r = extract(pattern, cache, CFG)  # the other verified by hashing: opened, nothing extracted
    assert (r.extracted, r.reused, sorted(opened)) == (4, 4, sorted(map(str, tars)))
    assert read_index(cache).shape[0] == 8
    opened.clear()
    assert extract(pattern, cache, CFG).reused == 8 and opened == []
