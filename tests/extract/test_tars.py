"""WebDataset tar shards as extract input: conventions, patterns and listings, fsspec URLs, resume by shard, hostile
tars, and bitwise equality with the same images extracted from a folder."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from catdog_cache.backbone import WeightsSpec
from catdog_cache.cache import read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import InputError
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.markers import markers_dir
from catdog_cache.sources import tars
from catdog_cache.sources.spec import expand_braces, resolve_inputs
from tests.conftest import TINY, draw, jpeg

CFG = ExtractConfig(WeightsSpec("random"), backbone="tiny", workers=0, batch_size=4, device="cpu")


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_equals_folder_bitwise_and_rerun_reads_nothing(tmp_path, images, opened):
    folder = tmp_path / "kaggle"
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    shard = make_tar(tmp_path / "train.tar", sorted(images.items()))
    extract(folder, tmp_path / "folder.h5", CFG)
    r = extract(shard, tmp_path / "tar.h5", CFG)
    assert (r.extracted, r.reused, r.failed, r.rows) == (8, 0, [], 8)
    a, b = read_index(tmp_path / "folder.h5"), read_index(tmp_path / "tar.h5")
    assert b.sources == [str(shard)]  # the row's source is its shard, its path the key
    assert [p.decode() for p in b.paths] == [p.decode()[:-4] for p in a.paths]  # cat.0.jpg -> key cat.0
    assert b.labels.tolist() == a.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert b.sha256 == a.sha256
    np.testing.assert_array_equal(read_features(tmp_path / "tar.h5", None), read_features(tmp_path / "folder.h5", None))
    assert opened == [str(shard)]
    mtime = (tmp_path / "tar.h5").stat().st_mtime_ns
    r = extract(shard, tmp_path / "tar.h5", CFG)  # a rerun does nothing: the shard is not even opened
    assert (r.extracted, r.reused, r.rows) == (0, 8, 8) and opened == [str(shard)]
    assert (tmp_path / "tar.h5").stat().st_mtime_ns == mtime


def test_conventions_cls_folders_and_bad_members(tmp_path):
    d = tmp_path / "drawn"
    members = [
        ("s/000001.jpg", jpeg("dog", 1, d)), ("s/000001.cls", b"1\n"), ("s/000001.json", b"{}"),
        ("s/000002.cls", b"0"), ("s/000002.png", draw(d / "x.png", "cat", 2).read_bytes()),  # .cls first: same sample
        ("train/Dog/a.jpg", jpeg("dog", 3, d)),  # label from the class folder in the key
        ("./cat.7.jpeg", jpeg("cat", 4, d)),  # Kaggle name: key cat.7, label from the prefix
        ("/abs/../../etc/x.webp", draw(d / "w.webp", "cat", 5).read_bytes()),  # hostile names are just keys
        ("u/plain.jpg", jpeg("cat", 6, d)),  # unlabeled
        ("bad/cls.jpg", jpeg("cat", 7, d)), ("bad/cls.cls", b"7"),  # class index out of range
        ("bad/notimg.jpg", b"not a jpeg"), ("meta/only.json", b"{}"),  # undecodable; no image member
        ("__index__", b"meta"), ("noext", b"x"),
    ]
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "s/000001.jpg")):
            link = tarfile.TarInfo(f"links/{kind.decode()}.jpg")
            link.type, link.linkname = kind, target
            tf.addfile(link)  # ignored: never followed, never a sample
        dev = tarfile.TarInfo("dev/zero.jpg")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 5
        tf.addfile(dev)
    r = extract(shard, tmp_path / "c.h5", CFG)
    idx = read_index(tmp_path / "c.h5")
    rows = dict(zip([p.decode() for p in idx.paths], idx.labels.tolist(), strict=True))
    assert rows == {"s/000001": 1, "s/000002": 0, "train/Dog/a": 1, "cat.7": 0, "/abs/../../etc/x": -1,
                    "u/plain": -1}
    failed = {os.fsdecode(p): reason for _, p, _, reason in idx.failed}
    assert set(failed) == {"bad/cls", "bad/notimg", "meta/only"}
    assert "class index 0..1" in failed["bad/cls"] and "not an image" in failed["bad/notimg"]
    assert "no .jpg" in failed["meta/only"]
    assert len(r.failed) == 3 and r.failed[0][0].startswith(f"{shard}#")
    assert not (tmp_path / "etc").exists() and not (tmp_path / "abs").exists()  # nothing written from members


def test_brace_patterns():
    assert expand_braces("s/train-{000..002}.tar") == [f"s/train-00{i}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]
    assert expand_braces("gs://b/s-{0000..0001}.tar") == ["gs://b/s-0000.tar", "gs://b/s-0001.tar"]
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="names 1,000,000,000,000 shards; at most 100,000"):
        expand_braces("s-{000000..999999}-{000000..999999}.tar")
    assert time.perf_counter() - t0 < 0.5 and tracemalloc.get_traced_memory()[1] < 2**20  # counted, not expanded
    tracemalloc.stop()
    with pytest.raises(InputError, match="neither a list"):
        expand_braces("s-{x}.tar")


def test_pattern_and_listing_give_one_source_per_shard(tmp_path, images):
    names = sorted(images)
    for k in range(3):  # shards 000..002 hold images k, k+3, ...
        make_tar(tmp_path / "shards" / f"train-{k:03d}.tar", [(n, images[n]) for n in names[k::3]])
    pattern = str(tmp_path / "shards" / "train-{000..002}.tar")
    r = extract(pattern, tmp_path / "p.h5", CFG)
    assert r.extracted == 8
    idx = read_index(tmp_path / "p.h5")
    assert idx.sources == [str(tmp_path / "shards" / f"train-{k:03d}.tar") for k in range(3)]
    listing = tmp_path / "list.txt"
    listing.write_text("# my shards\n\nshards/train-002.tar\n  shards/train-000.tar\nshards/train-001.tar\n"
                       "shards/train-002.tar\n")  # relative to the listing's folder; a repeat counts once
    assert resolve_inputs(listing) == [str(tmp_path / "shards" / f"train-{k:03d}.tar") for k in (2, 0, 1)]
    r = extract(listing, tmp_path / "p.h5", CFG)  # the same shards, already done
    assert (r.extracted, r.reused) == (0, 8)
    (tmp_path / "huge.txt").write_bytes(b"# x\n" * (5 * 2**20))
    with pytest.raises(InputError, match="larger than the 16 MiB"):
        resolve_inputs(tmp_path / "huge.txt")
    photo = draw(tmp_path / "photo.jpg", "cat", 1)
    with pytest.raises(InputError, match="not a folder: .*photo.jpg"):  # an image is no listing
        resolve_inputs(photo)


def test_fsspec_urls_memory_and_file(tmp_path, images, opened):
    fsspec = pytest.importorskip("fsspec")
    shard = make_tar(tmp_path / "m.tar", sorted(images.items()))
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/m-000.tar", shard.read_bytes())
    try:
        r = extract("memory://bucket/m-{000..000}.tar", tmp_path / "u.h5", CFG)
        assert r.extracted == 8 and read_index(tmp_path / "u.h5").sources == ["memory://bucket/m-000.tar"]
        from_url = read_features(tmp_path / "u.h5")
        assert extract("memory://bucket/m-000.tar", tmp_path / "u.h5", CFG).reused == 8
        assert opened == ["memory://bucket/m-000.tar"]
        fs.pipe("/bucket/m-000.tar", make_tar(tmp_path / "m2.tar", sorted(images.items())[:3]).read_bytes())
        r = extract("memory://bucket/m-000.tar", tmp_path / "u.h5", CFG)  # changed: redone, old keys dropped
        assert (r.extracted, r.rows) == (3, 3)
    finally:
        fs.rm("/bucket", recursive=True)
    r = extract(f"file://{shard}", tmp_path / "f.h5", CFG)
    assert r.extracted == 8 and read_index(tmp_path / "f.h5").sources == [str(shard)]
    np.testing.assert_array_equal(read_features(tmp_path / "f.h5"), from_url)


def test_missing_backend_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("fsspec")
    import sys

    registry = sys.modules["fsspec.registry"]  # the module (the package's `registry` attribute is its mapping)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed (the dev extra installs it)
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.delitem(registry._registry, "s3a", raising=False)
    with pytest.raises(InputError, match=r"no fsspec backend for s3://.*s3fs"):
        extract("s3://bucket/train-{0..1}.tar", tmp_path / "x.h5", CFG)


def test_changed_shard_redone_and_old_rows_superseded(tmp_path, images):
    names = sorted(images)
    shard = make_tar(tmp_path / "s.tar", [(n, images[n]) for n in names[:5]])
    extract(shard, tmp_path / "c.h5", CFG)
    before = read_index(tmp_path / "c.h5")
    make_tar(shard, [(n, images[n]) for n in names[3:]])  # 2 kept, 3 gone, 3 new
    r = extract(shard, tmp_path / "c.h5", CFG)
    idx = read_index(tmp_path / "c.h5")
    assert r.extracted == 5 and [p.decode() for p in idx.paths] == [n[:-4] for n in names[3:]]
    assert dict(zip(idx.paths, idx.sha256, strict=True))[names[3][:-4].encode()] == \
        dict(zip(before.paths, before.sha256, strict=True))[names[3][:-4].encode()]


def test_truncated_and_damaged_tars_are_failure_records(tmp_path, images):
    names = sorted(images)
    whole = make_tar(tmp_path / "whole.tar", [(n, images[n]) for n in names]).read_bytes()
    offsets = []
    with tarfile.open(tmp_path / "whole.tar") as tf:
        offsets = [m.offset_data for m in tf.getmembers()]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:offsets[5] + 100])  # inside the 6th image's data
    at_boundary = tmp_path / "boundary.tar"
    at_boundary.write_bytes(whole[:offsets[3] - 512])  # before the 4th header: no end-of-archive marker
    r = extract(f"{tmp_path}/{{cut,boundary}}.tar", tmp_path / "t.h5", CFG)
    idx = read_index(tmp_path / "t.h5")
    keys = {(idx.sources[s], p.decode()) for s, p in zip(idx.source.tolist(), idx.paths, strict=True)}
    assert keys == {(str(cut), n[:-4]) for n in names[:5]} | {(str(at_boundary), n[:-4]) for n in names[:2]}
    failed = {(idx.sources[s], p.decode()): reason for s, p, _, reason in idx.failed}
    assert failed.keys() == {(str(cut), names[5][:-4]), (str(at_boundary), names[2][:-4])}
    assert all("truncated" in why or "unexpected end" in why for why in failed.values())
    assert r.extracted == 7 and len(r.failed) == 2
    assert extract(f"{tmp_path}/{{cut,boundary}}.tar", tmp_path / "t.h5", CFG).extracted == 0  # done: not retried


def test_hostile_headers_never_allocated(tmp_path, images):
    """A GNU long name declaring 1 GiB, and an image member declaring 300 MiB: refused from the header."""
    def header(name: bytes, size: int, kind: bytes) -> bytes:
        info = tarfile.TarInfo(name.decode())
        info.size, info.type = size, kind
        return info.tobuf(tarfile.USTAR_FORMAT)

    data = images["cat.0.jpg"]
    good = make_tar(tmp_path / "g.tar", [("cat.0.jpg", data)]).read_bytes()[:512 + -(-len(data) // 512) * 512]
    longname = tmp_path / "longname.tar"
    longname.write_bytes(good + header(b"././@LongLink", 2**30, tarfile.GNUTYPE_LONGNAME) + b"\0" * 4096)
    big = tmp_path / "big.tar"
    big.write_bytes(good + header(b"dog.1.jpg", 300 * 2**20, tarfile.REGTYPE) + b"\xff" * 4096)
    tracemalloc.start()
    with open(longname, "rb") as fh:
        (cut,) = list(tars.read_samples(fh))  # the sample in progress when the stream broke is not a row
    assert cut.key == "cat.0" and cut.data is None and "1,073,741,824-byte extended header" in cut.reason
    with open(big, "rb") as fh:
        first, refused = list(tars.read_samples(fh))
    assert first.key == "cat.0" and first.data == images["cat.0.jpg"] and not first.reason
    assert refused.key == "dog.1" and refused.data is None and "larger than the 256 MiB file limit" in refused.reason
    assert tracemalloc.get_traced_memory()[1] < 32 * 2**20
    tracemalloc.stop()


def test_workers_split_shards_and_samples_exactly_once(tmp_path, images):
    names = sorted(images)
    one = [make_tar(tmp_path / "one.tar", [(n, images[n]) for n in names])]
    three = [make_tar(tmp_path / f"t{k}.tar", [(n, images[n]) for n in names[k::3]]) for k in range(3)]
    preset = CFG.resolve().preset
    for shards in (one, three):  # 1 shard: every worker reads it, decodes its share; 3: whole shards per worker
        ds = tars.TarSamples([str(s) for s in shards], ("center",), preset)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        items = list(loader)
        keys = sorted(ref.key for ref, x, _, _ in items if isinstance(ref, tars.Ref))
        assert keys == sorted(n[:-4] for n in names)
        ends = [ref for ref, *_ in items if isinstance(ref, tars.End)]
        assert len(ends) == (2 if shards is one else 3) and all(e.readers == (2 if shards is one else 1) for e in ends)


def slow_extract(spec: str, cache: Path, **popen) -> subprocess.Popen:
    """Extract `spec` in a child process, one row a part and 0.3 s a batch, and return once its first shard's done
    marker exists: a run to interrupt with some shards finished and some not."""
    script = ("import sys; from catdog_cache.extract.config import ExtractConfig; "
              "from catdog_cache.engines.dispatch import extract; "
              "from catdog_cache.backbone import WeightsSpec; "
              "extract(sys.argv[1], sys.argv[2], ExtractConfig(WeightsSpec('random'), backbone='tiny', workers=0, "
              "batch_size=1, device='cpu', part_rows=1))")
    proc = subprocess.Popen([sys.executable, "-c", script, spec, str(cache)],
                            env={**os.environ, "CATDOG_BATCH_DELAY": "0.3"}, **popen)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(markers_dir(cache).glob("*.json")):
        time.sleep(0.02)
    return proc


def test_resume_after_kill_skips_finished_shards(tmp_path, images):
    names = sorted(images)
    for k in range(4):
        make_tar(tmp_path / f"s-{k}.tar", [(n, images[n]) for n in names[2 * k:2 * k + 2]])
    pattern = str(tmp_path / "s-{0..3}.tar")
    extract(pattern, tmp_path / "ref.h5", CFG)
    cache = tmp_path / "c.h5"
    proc = slow_extract(pattern, cache, start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers_dir(cache).glob("*.json")))
    assert 1 <= done < 4 and not cache.exists()
    seen: list[str] = []
    real = tars.open_tar
    try:
        tars.open_tar = lambda s: (seen.append(s), real(s))[1]
        r = extract(pattern, cache, CFG)
    finally:
        tars.open_tar = real
    assert len(seen) == 4 - done and str(tmp_path / "s-0.tar") not in seen  # finished shards are not re-read
    assert r.reused == 2 * done
    ref, got = read_index(tmp_path / "ref.h5"), read_index(cache)
    assert got.keys() == ref.keys() and len(set(got.keys())) == 8  # no duplicates from the killed run's parts
    # same rows up to float rounding: the killed run's batches of 1 and the rerun's of 4 round differently
    np.testing.assert_allclose(read_features(cache), read_features(tmp_path / "ref.h5"), rtol=1e-5, atol=1e-6)


def test_cli_takes_shards_and_urls(cli, tmp_path, images):
    import json

    shard = make_tar(tmp_path / "shards" / "train-000.tar", sorted(images.items()))
    result = cli("extract", str(tmp_path / "shards" / "train-{000..000}.tar"), "--cache", tmp_path / "c.h5", *TINY,
                 "--workers", "0", "--json")
    report = json.loads(result.output)
    assert (report["extracted"], report["rows"], report["layout"]) == (8, 8, "webdataset")
    result = cli("info", tmp_path / "c.h5", "--json")
    assert str(shard) in result.output
    result = cli("extract", "s3://bucket/x-{0..1}.tar", "--cache", tmp_path / "c.h5", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "catdog-cache[remote]" in result.output or "s3://bucket/x-0.tar" in result.output, result.output


def test_a_store_that_refuses_is_one_line_naming_the_url(cli, tmp_path, monkeypatch):
    """The backend's own exceptions (botocore: no credentials, no endpoint) are one line naming the shard's URL, not
    a traceback (they are not OSErrors)."""
    pytest.importorskip("s3fs", reason="the [remote] extra is not installed")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1-s probes of an instance's metadata service
    result = cli("extract", "s3://bucket/x-{0..1}.tar", "--cache", tmp_path / "c.h5", ok=False)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "s3://bucket/x-0.tar" in result.output and "credentials" in result.output, result.output
    assert not (tmp_path / "c.h5").exists()


def test_classes_name_cls_indexes_and_class_folders(cli, tmp_path):
    """--classes: a .cls index and a key's class folder label into the names given (in .cls order, lower-cased);
    later shards take the cache's classes without the option; contradicting ones and folders are refused."""
    d = tmp_path / "drawn"
    members = []
    for i in range(6):
        members += [(f"s/{i:06d}.jpg", jpeg("cat" if i % 2 else "dog", i, d)), (f"s/{i:06d}.cls", str(i % 3).encode())]
    members += [("BIRD/x.jpg", jpeg("cat", 9, d)), ("s/bad.jpg", jpeg("dog", 8, d)), ("s/bad.cls", b"3")]
    first = make_tar(tmp_path / "a.tar", members)
    cache = tmp_path / "c.h5"
    r = extract(first, cache, CFG, classes=["Bird", "cat", "dog"])
    idx = read_index(cache)
    assert idx.classes == ["bird", "cat", "dog"] and r.rows == 7
    rows = dict(zip([p.decode() for p in idx.paths], idx.labels.tolist(), strict=True))
    assert rows == {**{f"s/{i:06d}": i % 3 for i in range(6)}, "BIRD/x": 0}
    assert "0..2" in dict((os.fsdecode(p), why) for _, p, _, why in idx.failed)["s/bad"]
    second = make_tar(tmp_path / "b.tar", [("t/1.jpg", jpeg("dog", 11, d)), ("t/1.cls", b"2"),
                                           ("dog/2.jpg", jpeg("dog", 12, d))])
    extract(second, cache, CFG)  # no --classes: the cache's own (cat, dog would make .cls 2 a failure)
    rows = dict(zip([p.decode() for p in read_index(cache).paths], read_index(cache).labels.tolist(), strict=True))
    assert (rows["t/1"], rows["dog/2"]) == (2, 2)
    with pytest.raises(InputError, match="fixed by its first labeled input"):
        extract(second, cache, CFG, classes=["cat", "dog"])
    with pytest.raises(InputError, match="distinct"):
        extract(first, tmp_path / "other.h5", CFG, classes=["cat", "Cat"])
    folder = tmp_path / "folder"
    draw(folder / "cat.1.jpg", "cat", 1)
    result = cli("extract", folder, "--cache", tmp_path / "f.h5", *TINY, "--classes", "a,b", ok=False)
    assert result.exit_code != 0 and "--classes names the classes of tar shards" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "f.h5").exists()
    # the default stays cat, dog: a .cls beyond it says how to name more
    with pytest.raises(InputError, match=r"0\.\.1 \(name more classes with extract --classes\)"):
        extract(make_tar(tmp_path / "c.tar", [("u/1.jpg", jpeg("cat", 13, d)), ("u/1.cls", b"2")]), tmp_path / "d.h5",
                CFG)
