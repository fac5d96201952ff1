"""One test per hardening item: crafted heads, exports and caches; planted symlinks; a full disk; FIFOs; control
characters; CSV injection. Every hostile file is built here, from a real cache, head and export made with TINY."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from catdog_cache.cache import compact
from catdog_cache.cli import app
from tests.conftest import TINY, draw
from tests.hostile.blocking import returns_within

FIT = ["--epochs", "1", "--quiet"]
SECRET = b"TOPSECRET-CONTENT-0123456789ABCD"  # 32 bytes: must never be copied into anything under cache/


# ---------------------------------------------------------------- shared material (built once, copied per test)

def build_base(root: Path, export: bool = True) -> SimpleNamespace:
    """A real cache and head (4 cats + 4 dogs, TINY), 3 unlabeled images (test1) and, with export, a .pt2."""
    train, test = root / "train", root / "test1"
    for i in range(4):
        draw(train / f"cat.{i}.jpg", "cat", i)
        draw(train / f"dog.{i}.jpg", "dog", 100 + i)
    for i in range(1, 4):
        draw(test / f"{i}.jpg", "cat" if i % 2 else "dog", 400 + i)
    cache, head, model = root / "cache" / "features.h5", root / "cache" / "features.head.pt", root / "m.pt2"
    runner = CliRunner()
    steps = [["extract", train, "--cache", cache, *TINY, "--quiet"], ["fit", "--cache", cache, *FIT]]
    for args in steps + ([["export", "--head", head, "--out", model]] if export else []):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    compact(cache, {}, single=True)  # one schema-1 file: the suites copy it and craft variants of it
    return SimpleNamespace(root=root, train=train, test=test, cache=cache, head=head,
                           model=model if export else None, rows=rows_of(cache))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """build_base with an export, built once per module. Read-only for tests."""
    return build_base(tmp_path_factory.mktemp("base"))


def install(base, cache: bool = True, head: bool = True) -> None:
    """The base cache and head at the CLI's default places in this test's folder."""
    Path("cache").mkdir(exist_ok=True)
    if cache:
        shutil.copyfile(base.cache, "cache/features.h5")
    if head:
        shutil.copyfile(base.head, "cache/features.head.pt")


def refused(r, *any_of: str) -> str:
    """A user error: exit 1, one line, no traceback (in-process: no exception other than the exit), and one of the
    expected words."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    assert any(word in r.output for word in any_of), r.output
    return r.output


def rows_of(cache) -> int:
    with h5py.File(cache, "r") as f:
        return len(f["labels"])


def read_csv(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))


def files_under(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink()]


def holds_secret(folder: Path) -> list[Path]:
    return [p for p in files_under(folder) if SECRET in p.read_bytes()]


class Evil:
    """Unpickling this runs a shell command: the marker file appears iff something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def evil_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Evil(marker), buf)
    return buf.getvalue()


def rewrite_zip(src: Path, dst: Path, replace: dict | None = None, add: dict | None = None,
                compress: int = zipfile.ZIP_STORED) -> None:
    """Copy a zip member by member; `replace` maps a member (without the top folder) to new bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = zin.infolist()[0].filename.split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            rel = info.filename.split("/", 1)[1]
            if replace and rel in replace:
                data = replace[rel](data) if callable(replace[rel]) else replace[rel]
            zout.writestr(info.filename, data, compress_type=compress)
        for rel, data in (add or {}).items():
            zout.writestr(f"{top}/{rel}", data, compress_type=compress)


def craft_cache(src: Path, dst: Path, overrides: dict | None = None) -> None:
    """A new HDF5 file with src's attributes and objects, except those in `overrides` (name -> fn(dst_file, src_ds))."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        for name in f:
            if overrides and name in overrides:
                overrides[name](g, f[name])
            else:
                f.copy(f[name], g, name=name)


def crafted_head(base, dst: Path, change) -> Path:
    blob = torch.load(base.head, map_location="cpu", weights_only=True)
    change(blob)
    torch.save(blob, dst)
    return dst


def small_folder(root: Path, n: int = 1, seed: int = 700) -> Path:
    for i in range(n):
        draw(root / f"cat.{i}.jpg", "cat", seed + i)
    return root


# ---------------------------------------------------------------- 1. predict --model never unpickles

def _sample_inputs(marker):
    return {"data/sample_inputs/model.pt": evil_bytes(marker)}


def _pickled_weight(marker):
    def config(data: bytes) -> bytes:
        return data.replace(b'"path_name": "weight_0", "is_param": true, "use_pickle": false',
                            b'"path_name": "weight_0", "is_param": true, "use_pickle": true', 1)

    return {"data/weights/model_weights_config.json": config, "data/weights/weight_0": evil_bytes(marker)}


@pytest.mark.parametrize("variant", ["sample_inputs", "use_pickle", "legacy_member", "deflated"])
def test_crafted_export_is_refused_before_unpickling(cli, base, tmp_path, variant):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt2"
    if variant == "sample_inputs":
        rewrite_zip(base.model, evil, replace=_sample_inputs(marker))
    elif variant == "use_pickle":
        with zipfile.ZipFile(base.model) as z:  # the crafted flag is really there
            name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
            assert b'"use_pickle": false' in z.read(name)
        rewrite_zip(base.model, evil, replace=_pickled_weight(marker))
        with zipfile.ZipFile(evil) as z:
            assert b'"use_pickle": true' in z.read(name)
    elif variant == "legacy_member":
        rewrite_zip(base.model, evil, add={"data/weights/model.pt": evil_bytes(marker)})
    else:
        rewrite_zip(base.model, evil, compress=zipfile.ZIP_DEFLATED)
    r = cli("predict", base.test, "--model", evil, ok=False)
    refused(r, "refusing", "not a model exported")
    assert not marker.exists()
    assert not Path("cache/predictions.csv").exists()


def test_genuine_export_still_predicts(cli, base):
    r = cli("predict", base.test, "--model", base.model, "--quiet")
    assert r.exit_code == 0
    rows = read_csv("cache/predictions.csv")
    assert [row[0] for row in rows[1:]] == ["1.jpg", "2.jpg", "3.jpg"]


# ---------------------------------------------------------------- 2. the demo never claims a folder by a planted marker

def test_demo_refuses_a_symlinked_marker(cli, tmp_path, monkeypatch):
    import catdog_cache.demo as demo_mod

    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    (folder / ".catdog-demo").symlink_to(outside)

    def claimed(*a, **k):  # the demo got past claim(): stop before it draws 56 images into someone's folder
        raise AssertionError("the demo claimed a folder it did not make")

    monkeypatch.setattr(demo_mod, "make_sample_set", claimed)
    r = cli("demo", "--backbone", "tiny", "--weights", "random", "--folder", folder, ok=False)
    assert outside.read_text() == "not yours"  # never written through
    assert (folder / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == [".catdog-demo", "thesis.txt"]
    assert (folder / ".catdog-demo").is_symlink()  # untouched: not replaced by a demo marker
    refused(r, "not made by the demo")


# ---------------------------------------------------------------- 3. planted symlinks

def test_planted_temp_symlinks_are_never_followed(cli, base, tmp_path):
    install(base)
    victim = tmp_path / "victim.txt"
    victim.write_text("victim content")
    from catdog_cache.cache import Provenance
    from catdog_cache.fit.head import load_head

    prov = Provenance.from_json(load_head(base.head)[1]["provenance"]).to_json()
    test_cache = f"test1.{hashlib.sha256(prov.encode()).hexdigest()[:8]}.h5"  # where predict caches base.test
    planted = ["features.h5.tmp", "features.head.pt.tmp", "features.head.png.tmp", "predictions.csv.tmp",
               ".features.h5.planted.tmp", f"{test_cache}.tmp"]
    for name in planted:
        (Path("cache") / name).symlink_to(victim)
    data = small_folder(tmp_path / "more")  # a new source: extract assembles a new cache file
    cli("extract", data, *TINY, "--quiet")
    cli("fit", *FIT)
    cli("predict", base.test, "--quiet")
    assert victim.read_text() == "victim content"
    assert all((Path("cache") / name).is_symlink() for name in planted)
    assert rows_of("cache/features.h5") == base.rows + 1
    assert rows_of(Path("cache") / test_cache) == 3
    assert len(read_csv("cache/predictions.csv")) == 4


def test_planted_lock_symlink_is_refused(cli, base, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("victim content")
    Path("cache").mkdir()
    Path("cache/features.h5.lock").symlink_to(victim)
    refused(cli("extract", base.train, *TINY, ok=False), "symbolic link")
    assert victim.read_text() == "victim content"
    assert not Path("cache/features.h5").exists()


def test_planted_parts_symlink_is_refused(cli, base, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    Path("cache").mkdir()
    Path("cache/features.h5.parts").symlink_to(target)
    refused(cli("extract", base.train, *TINY, ok=False), "symbolic link")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    install(base, head=False)  # and with a cache in place (the path that lists parts before assembly)
    refused(cli("extract", small_folder(tmp_path / "more"), *TINY, ok=False), "symbolic link")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------- 4. outputs that would overwrite inputs

def test_outputs_may_not_overwrite_inputs(cli, base, tmp_path):
    install(base)
    cache_bytes, head_bytes = Path("cache/features.h5").read_bytes(), Path("cache/features.head.pt").read_bytes()
    refused(cli("fit", "--head", "cache/features.h5", *FIT, ok=False), "same file")
    assert Path("cache/features.h5").read_bytes() == cache_bytes
    refused(cli("fit", "--head", "x.png", *FIT, ok=False), "same file")
    assert not Path("x.png").exists()
    refused(cli("predict", base.test, "--out", "cache/features.head.pt", ok=False), "same file")
    assert Path("cache/features.head.pt").read_bytes() == head_bytes
    Path("outdir").mkdir()
    refused(cli("predict", base.test, "--out", "outdir", ok=False), "is a folder")
    assert sorted(p.name for p in Path("cache").iterdir()) == ["features.h5", "features.head.pt"]  # no work done
    assert list(Path("outdir").iterdir()) == []


# ---------------------------------------------------------------- 5. crafted caches: external, virtual, linked data

def _external_sha(secret_file: Path):
    def make(g, ds):
        n = ds.shape[0]
        secret_file.write_bytes(b"".join(SECRET.ljust(64, b"#") for _ in range(n)))
        g.create_dataset("sha256", shape=(n,), dtype="S64", external=[(str(secret_file), 0, 64 * n)])
    return make


def _virtual_sha(secret_file: Path):
    def make(g, ds):
        n = ds.shape[0]
        with h5py.File(secret_file, "w") as s:
            s.create_dataset("s", data=np.array([SECRET.ljust(64, b"#")] * n, dtype="S64"))
        layout = h5py.VirtualLayout(shape=(n,), dtype="S64")
        layout[:] = h5py.VirtualSource(str(secret_file), "s", shape=(n,))
        g.create_virtual_dataset("sha256", layout)
    return make


def _linked_features(secret_file: Path):
    def make(g, ds):
        feats = ds[...]
        feats[0, 0, : len(SECRET) // 4] = np.frombuffer(SECRET, dtype="<f4")  # finite floats holding the secret
        with h5py.File(secret_file, "w") as s:
            s.create_dataset("features", data=feats, chunks=ds.chunks)
        g["features"] = h5py.ExternalLink(str(secret_file), "/features")
    return make


@pytest.mark.parametrize("kind", ["external", "virtual", "external_link"])
def test_crafted_cache_storage_is_refused(cli, base, tmp_path, kind):
    secret_file = tmp_path / "outside" / "secret.bin"
    secret_file.parent.mkdir()
    make = {"external": _external_sha, "virtual": _virtual_sha, "external_link": _linked_features}[kind](secret_file)
    name = "features" if kind == "external_link" else "sha256"
    craft_cache(base.cache, Path("cache/features.h5"), {name: make})
    with h5py.File("cache/features.h5", "r") as f:  # the crafted cache works as crafted
        data = f[name][0].tobytes()
        assert SECRET in data
    assert holds_secret(Path("cache")) == []  # the secret lives outside cache/
    more = small_folder(tmp_path / "more")  # a new source: an unprotected extract would copy every old row
    refused(cli("extract", more, *TINY, ok=False), "refusing a crafted cache", "link")
    refused(cli("fit", *FIT, ok=False), "refusing a crafted cache", "link")
    refused(cli("info", ok=False), "refusing a crafted cache", "link")
    assert holds_secret(Path("cache")) == []


# ---------------------------------------------------------------- 6. --strict keeps saved parts

def test_strict_keeps_parts_of_an_earlier_run(cli, base, tmp_path):
    from catdog_cache.backbone import WeightsSpec
    from catdog_cache.cache import Rows, parts_dir, write_part
    from catdog_cache.extract.config import ExtractConfig, versions
    from catdog_cache.extract.rerun import sha256_file

    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(base.train / "cat.0.jpg", data / "cat.0.jpg")
    shutil.copyfile(base.train / "dog.0.jpg", data / "dog.0.jpg")
    prov = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny").provenance()
    with h5py.File(base.cache, "r") as f:
        feature = f["features"][0]  # [1, 4096]: cat.0.jpg's row
    rows = Rows(features=[feature], paths=[b"cat.0.jpg"], labels=[0], sha256=[sha256_file(data / "cat.0.jpg")])
    part = write_part(Path("cache/features.h5"), "part-earlier-000000", prov, str(data.resolve()), rows, versions(),
                      (1, 4096))
    assert part.parent == parts_dir(Path("cache/features.h5"))
    before = part.read_bytes()
    (data / "cat.9.jpg").write_bytes(b"not an image")
    r = cli("extract", data, *TINY, "--strict", ok=False)
    refused(r, "--strict")
    assert part.is_file() and part.read_bytes() == before
    assert not Path("cache/features.h5").exists()  # nothing was added


# ---------------------------------------------------------------- 7. the lock dies with the process

def test_lock_dies_with_a_killed_extract(cli, base, tmp_path):
    env = {**os.environ, "CATDOG_BATCH_DELAY": "0.2", "TMPDIR": str(tmp_path)}  # a killed run's pymp-* stay here
    cache = Path("cache/features.h5").resolve()
    proc = subprocess.Popen([sys.executable, "-m", "catdog_cache", "extract", str(base.train), "--cache", str(cache),
                             *TINY, "--workers", "2", "--batch-size", "1", "--part-rows", "1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        parts = cache.with_name("features.h5.shards")
        while not (cache.with_name("features.h5.lock").exists() and parts.is_dir() and any(parts.glob("*.h5"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the extract never started writing parts"
            time.sleep(0.02)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # the parent only: its loader workers may outlive it for a moment
        proc.wait()
        r = cli("extract", base.train, *TINY, "--workers", "0", "--quiet", ok=False)
        assert "in use" not in r.output
        assert r.exit_code == 0, r.output
        assert rows_of(cache) == base.rows
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # any surviving loader worker of the killed run
        proc.stderr.close()


# ---------------------------------------------------------------- 8. a full disk

def test_not_enough_space_keeps_the_old_cache(cli, base, tmp_path, monkeypatch):
    """An append copies no rows (it needs room for its shard and the index only); compact, which does, checks the
    free space first and leaves the cache as it was."""
    import catdog_cache.files as files_mod

    install(base, head=False)
    monkeypatch.setattr(files_mod, "free_bytes", lambda folder: 1000)
    cli("extract", small_folder(tmp_path / "more"), *TINY, "--quiet")
    before = Path("cache/features.h5").read_bytes()
    shards = sorted(p.name for p in Path("cache/features.h5.shards").iterdir())
    refused(cli("compact", ok=False), "not enough space")
    assert Path("cache/features.h5").read_bytes() == before
    assert sorted(p.name for p in Path("cache/features.h5.shards").iterdir()) == shards
    assert [p for p in Path("cache").rglob("*.tmp")] == []


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (needs root and mount rights); unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_and_leaves_no_temp_files(cli, base, small_fs):
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_fs).free - 64 * 1024))  # 64 KiB left: a part does not fit
    cache = small_fs / "c.h5"
    r = subprocess.run([sys.executable, "-m", "catdog_cache", "extract", str(base.train), "--cache", str(cache),
                        *TINY, "--workers", "0", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)  # never 139 / -11 (a crashed HDF5)
    out = (r.stdout + r.stderr).strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert "space" in out.lower() or "disk full" in out.lower(), out
    assert [p for p in small_fs.rglob("*") if p.name.endswith(".tmp")] == []
    assert not cache.exists()
    filler.unlink()
    cli("extract", base.train, *TINY, "--cache", cache, "--workers", "0", "--quiet")
    assert rows_of(cache) == base.rows


# ---------------------------------------------------------------- 9. FIFOs and devices



def test_bounded_reads_of_regular_files_only(tmp_path):
    from catdog_cache.files import read_regular, sha256_regular

    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 5000)
    for fn in (read_regular, sha256_regular):
        with pytest.raises(OSError, match="not a regular file"):
            returns_within(lambda fn=fn: fn(fifo, 10**6), unblock=fifo)
        with pytest.raises(OSError, match="not a regular file"):
            returns_within(lambda fn=fn: fn(zero, 10**6))
        assert returns_within(lambda fn=fn: fn(big, 5000)) in (b"x" * 5000, hashlib.sha256(b"x" * 5000).hexdigest())
    with pytest.raises(ValueError, match="file limit"):
        read_regular(big, 4999)
    with pytest.raises(OSError, match="too large"):  # callers (extract's hashing) catch OSError
        sha256_regular(big, 4999)


def test_image_that_became_a_fifo_is_a_failure_not_a_hang(tmp_path):
    from catdog_cache.backbone import IMAGENET
    from catdog_cache.extract.loader import ImageFiles

    root = tmp_path / "data"
    draw(root / "cat.0.jpg", "cat", 1)
    os.mkfifo(root / "cat.1.jpg")  # discovered as an image, swapped for a FIFO before it was read
    files = ImageFiles(root, ["cat.0.jpg", "cat.1.jpg"], ("center",), IMAGENET)
    assert returns_within(lambda: files[0])[1] is not None
    i, x, sha, reason = returns_within(lambda: files[1], unblock=root / "cat.1.jpg")
    assert (i, x, sha) == (1, None, "") and "not a regular file" in reason


# ---------------------------------------------------------------- 10. files that would allocate without bound

def test_compressed_head_is_refused(cli, base, tmp_path):
    install(base, cache=False)
    rewrite_zip(base.head, tmp_path / "deflated.pt", compress=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(tmp_path / "deflated.pt") as z:
        assert all(m.compress_type == zipfile.ZIP_DEFLATED for m in z.infolist())
    refused(cli("predict", base.test, "--head", tmp_path / "deflated.pt", ok=False), "compressed or oversized")
    assert not list(Path("cache").glob("test1.*.h5"))


def _huge(n: int, everything: bool):
    def rows(g, name, dtype):
        g.create_dataset(name, shape=(n,), dtype=dtype, chunks=(1024,))

    def make_features(g, ds):
        if everything:
            g.create_dataset("features", shape=(n, *ds.shape[1:]), dtype=ds.dtype, chunks=ds.chunks)
        else:
            ds.file.copy(ds, g, name="features")

    def make(kind):
        return lambda g, ds: rows(g, kind, {"labels": "i1", "source": "u2", "sha256": "S64",
                                            "paths": h5py.vlen_dtype(bytes)}[kind])

    overrides = {"features": make_features, "labels": make("labels")}
    if everything:
        overrides |= {"source": make("source"), "sha256": make("sha256"), "paths": make("paths")}
    return overrides


@pytest.mark.parametrize("everything", [True, False], ids=["all-rows", "labels-only"])
def test_cache_declaring_a_trillion_rows_is_refused(cli, base, everything):
    craft_cache(base.cache, Path("cache/features.h5"), _huge(10**12, everything))
    assert Path("cache/features.h5").stat().st_size < 2**20
    for args in (["info"], ["fit", *FIT]):
        r = cli(*args, ok=False)
        assert "MemoryError" not in r.output
        if everything:
            refused(r, "refusing", "cannot hold")
        else:
            refused(r, "rows")  # "labels has 1000000000000 rows, features 8"


# ---------------------------------------------------------------- 11. NaN and other non-finite numbers

def test_fit_lr_inf_is_refused(cli, base):
    install(base, head=False)
    refused(cli("fit", "--lr", "inf", *FIT, ok=False), "--lr")
    assert not Path("cache/features.head.pt").exists()


def test_fit_lr_beyond_float32_is_one_line(cli, base):
    install(base, head=False)
    refused(cli("fit", "--lr", "1e39", *FIT, ok=False), "--lr", "diverged")
    assert not Path("cache/features.head.pt").exists()


def test_nan_feature_is_refused_by_fit(cli, base):
    install(base, head=False)
    with h5py.File("cache/features.h5", "r+") as f:
        f["features"][3, 0, 17] = np.nan
    refused(cli("fit", *FIT, ok=False), "NaN")
    assert not Path("cache/features.head.pt").exists()


def _nan_weight(blob):
    blob["state_dict"]["linear.weight"][1, 5] = float("nan")


def _double_weights(blob):
    blob["state_dict"] = {k: v.double() for k, v in blob["state_dict"].items()}


def _transform_not_json(blob):
    import json as _json

    prov = _json.loads(blob["provenance"])
    prov["transform"] = "not json"
    blob["provenance"] = _json.dumps(prov)


@pytest.mark.parametrize(("change", "field"), [
    (lambda b: b.update(temperature=0.0), "temperature"),
    (lambda b: b.update(temperature=float("nan")), "temperature"),
    (lambda b: b.update(temperature=-1.0), "temperature"),
    (lambda b: b.update(clip=0.7), "clip"),
    (_nan_weight, "NaN"),
    (_double_weights, "float32"),
    (_transform_not_json, "provenance"),
], ids=["temperature-0", "temperature-nan", "temperature-neg", "clip-0.7", "nan-weight", "float64-weights",
        "transform-not-json"])
def test_crafted_head_numbers_are_refused(cli, base, tmp_path, change, field):
    head = crafted_head(base, tmp_path / "crafted.pt", change)
    out = refused(cli("predict", base.test, "--head", head, ok=False), field)
    assert "damaged or crafted" in out or "NaN or infinite weights" in out or "is damaged" in out
    assert not Path("cache/predictions.csv").exists()


def test_diverged_fit_saves_no_head(cli, base):
    """Finite but enormous features (3e38: float32 still holds them) overflow the logits: the loss is NaN."""
    install(base)
    before = Path("cache/features.head.pt").read_bytes()
    with h5py.File("cache/features.h5", "r+") as f:
        f["features"][...] = np.float32(3e38)  # the largest float32s: any weighted sum of them overflows
    r = cli("fit", "--dropout", "0", *FIT, ok=False)
    refused(r, "diverged", "NaN or infinite")
    assert Path("cache/features.head.pt").read_bytes() == before  # the earlier head survives
    assert not Path("cache/features.head.png").exists()
    refused(cli("fit", "--dropout", "0", "--head", "new.pt", *FIT, ok=False), "diverged", "NaN or infinite")
    assert not Path("new.pt").exists() and not Path("new.png").exists()


# ---------------------------------------------------------------- 12. one handle, consistent lengths

def test_labels_shorter_than_features_is_damaged(cli, base):
    from catdog_cache.cache import open_cache
    from catdog_cache.errors import CacheError

    def short(g, ds):
        g.create_dataset("labels", data=ds[:-1])

    craft_cache(base.cache, Path("cache/features.h5"), {"labels": short})
    with pytest.raises(CacheError, match="damaged"), open_cache("cache/features.h5"):
        pass
    refused(cli("fit", *FIT, ok=False), "damaged")


# ---------------------------------------------------------------- 13. a symlinked cache stays a symlink

def test_symlinked_cache_is_updated_where_it_points(cli, base, tmp_path):
    real = tmp_path / "elsewhere" / "real.h5"
    real.parent.mkdir()
    shutil.copyfile(base.cache, real)
    Path("cache").mkdir()
    Path("cache/features.h5").symlink_to(real)
    cli("extract", small_folder(tmp_path / "more"), *TINY, "--quiet")
    assert Path("cache/features.h5").is_symlink() and Path("cache/features.h5").resolve() == real.resolve()
    assert rows_of(real) == base.rows + 1
    assert sorted(p.name for p in Path("cache").iterdir()) == ["features.h5"]


# ---------------------------------------------------------------- 14. one-line errors

def _set_attr(name, value):
    def change(path):
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value
    return change


def _set_row(name, value):
    def change(path):
        with h5py.File(path, "r+") as f:
            f[name][0] = value
    return change


def _two_d_features(path):
    with h5py.File(path, "r+") as f:
        n = f["features"].shape[0]
        del f["features"]
        f.create_dataset("features", data=np.zeros((n, 4096), np.float32))


@pytest.mark.parametrize(("change", "words"), [
    (_set_attr("schema_version", "1"), ["schema_version"]),
    (_set_row("labels", 7), ["labels outside"]),
    (_set_row("source", 5), ["source folders"]),
    (_two_d_features, ["shape"]),
], ids=["schema-string", "label-7", "source-out-of-range", "features-2d"])
def test_crafted_cache_fields_are_one_line(cli, base, change, words):
    install(base, head=False)
    change(Path("cache/features.h5"))
    for args in (["info"], ["fit", *FIT]):
        refused(cli(*args, ok=False), *words)


@pytest.mark.parametrize(("change", "words"), [
    (lambda b: b.pop("provenance"), ["provenance"]),
    (lambda b: b.update(provenance="{not json"), ["provenance"]),
], ids=["no-provenance", "provenance-not-json"])
def test_crafted_head_provenance_is_one_line(cli, base, tmp_path, change, words):
    head = crafted_head(base, tmp_path / "crafted.pt", change)
    refused(cli("predict", base.test, "--head", head, ok=False), *words)


@pytest.mark.parametrize("seed", ["-1", "100000000000000000000000"])
def test_out_of_range_seed_is_one_line(cli, base, seed):
    refused(cli("extract", base.train, *TINY, "--seed", seed, ok=False), "--seed")
    assert not Path("cache/features.h5").exists()


def test_max_memory_inf_is_one_line(cli, base):
    install(base, head=False)
    refused(cli("fit", "--max-memory", "inf", *FIT, ok=False), "--max-memory")


def test_deeply_nested_folder_is_no_traceback(cli, tmp_path):
    root = tmp_path / "nest"
    deep = root / "cat"
    deep.mkdir(parents=True)
    for _ in range(999):  # os.makedirs recurses per level itself: build it one mkdir at a time
        deep = deep / "d"
        deep.mkdir()
    draw(deep / "x.jpg", "cat", 1)
    try:
        r = cli("extract", root, *TINY, "--quiet", ok=False)
    finally:  # remove it bottom-up: Python 3.11's shutil.rmtree (pytest's clean-up) recurses per level too
        (deep / "x.jpg").unlink()
        while deep != root:
            deep.rmdir()
            deep = deep.parent
    assert not isinstance(r.exception, RecursionError), "RecursionError"
    assert r.exit_code in (0, 1) and "Traceback" not in r.output
    if r.exit_code == 1:
        refused(r, "")


# ---------------------------------------------------------------- 15. messages

def test_cache_that_is_a_folder_or_truncated(cli, base, tmp_path):
    Path("cache/features.h5").mkdir(parents=True)
    for args in (["info"], ["fit", *FIT], ["extract", base.train, *TINY]):
        refused(cli(*args, ok=False), "is a folder")
    Path("cache/features.h5").rmdir()
    Path("cache/features.h5").write_bytes(base.cache.read_bytes()[:100])
    for args in (["info"], ["fit", *FIT], ["extract", base.train, *TINY]):
        out = refused(cli(*args, ok=False), "not a readable HDF5 cache")
        assert "HDF5_USE_FILE_LOCKING" not in out
    assert Path("cache/features.h5").read_bytes() == base.cache.read_bytes()[:100]


# ---------------------------------------------------------------- 16. control characters from file names

def test_control_characters_are_shown_escaped(cli, base):
    osc = "\x1b]52;c;SGVsbG8=\x07"  # would set the terminal's clipboard
    root = Path(tempfile.mkdtemp(prefix="d\x1b[31m", dir="/tmp"))  # short: info's table elides long folder names
    try:
        shutil.copyfile(base.train / "cat.0.jpg", root / "cat.0.jpg")
        shutil.copyfile(base.train / "dog.0.jpg", root / "dog.0.jpg")
        (root / f"cat.{osc}.jpg").write_bytes(b"\x1b[2J garbage, not a JPEG")
        extracted, info = cli("extract", root, *TINY).output, cli("info").output
    finally:
        shutil.rmtree(root)
    for text in (extracted, info):
        assert "\x1b" not in text and "\x07" not in text
        assert "\\x1b]52;c;SGVsbG8=\\x07" in text  # the failed file, shown escaped
    assert "/tmp/d\\x1b[31m" in info  # the source folder, escaped too


# ---------------------------------------------------------------- 17. CSV injection

def test_formula_file_names_are_quoted_in_the_csv(cli, base, tmp_path):
    install(base)
    root = tmp_path / "unlabeled"
    names = ['=HYPERLINK("x").jpg', "+1.jpg", "@SUM(A1).jpg", "plain.jpg"]
    root.mkdir()
    for i, name in enumerate(names):
        shutil.copyfile(base.test / f"{i % 3 + 1}.jpg", root / name)
    cli("predict", root, "--quiet")
    rows = read_csv("cache/predictions.csv")[1:]
    cells = sorted(row[0] for row in rows)
    assert cells == sorted(["'" + n for n in names[:3]] + ["plain.jpg"])
    lines = Path("cache/predictions.csv").read_text().splitlines()[1:]
    assert len(lines) == 4
    for line in lines:  # numbers stay numbers: unquoted, parseable
        assert re.search(r",[0-9.e-]+,[0-9.e-]+,(cat|dog)$", line), line
    for row in rows:
        assert 0 <= float(row[1]) <= 1 and abs(float(row[1]) + float(row[2]) - 1) < 1e-5


# ---------------------------------------------------------------- 18. reduced precision stops at the backbone

def test_bf16_extraction_head_scores_in_float32(cli, base):
    from catdog_cache.cache import read_features, read_index
    from catdog_cache.fit.head import load_head

    cli("extract", base.train, *TINY, "--precision", "bf16", "--quiet")
    cli("fit", *FIT)
    cli("predict", base.test, "--quiet")
    (test_cache,) = Path("cache").glob("test1.*.h5")
    idx = read_index(test_cache)
    assert idx.provenance.precision == "bf16"
    head, meta = load_head("cache/features.head.pt")
    x = torch.from_numpy(read_features(test_cache))  # [N, 4096] float32
    with torch.no_grad():
        want = (head(x) / float(meta.get("temperature", 1.0))).softmax(1).numpy()
    got = {row[0]: (float(row[1]), float(row[2])) for row in read_csv("cache/predictions.csv")[1:]}
    rels = [p.decode() for p in idx.paths]
    assert sorted(got) == sorted(rels)
    np.testing.assert_allclose(np.array([got[r] for r in rels]), want, rtol=0, atol=1e-6)
