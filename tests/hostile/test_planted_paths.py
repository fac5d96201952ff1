"""Hardening, round 3: paths that files from outside (heads, caches) or other people (a prepared folder, a planted
link) choose, and the rough edges around them: torchrun environments, JSON of non-UTF-8 names, closed pipes. Every
hostile input is built here."""

from __future__ import annotations

import codecs
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import TINY, draw
from tests.hostile import test_crafted_files
from tests.hostile.blocking import proc_file, returns_within
from tests.hostile.test_crafted_files import (
    FIT,
    SECRET,
    crafted_head,
    install,
    read_csv,
    refused,
    small_folder,
)

base = test_crafted_files.base  # the same real cache, head and export (a module-scoped fixture)
FILE_WEIGHTS = "file:sha256=" + "ab" * 32  # a head trained on features from a weights file


def default_test_cache(base) -> str:
    """The name predict gives base.test's features beside the head (folder name + provenance digest)."""
    from catdog_cache.cache import Provenance
    from catdog_cache.fit.head import load_head

    prov = Provenance.from_json(load_head(base.head)[1]["provenance"]).to_json()
    return f"test1.{hashlib.sha256(prov.encode()).hexdigest()[:8]}.h5"


def file_weights_head(base, dst: Path, recorded: str, cache: str | None = None) -> Path:
    """base's head, claiming features of a weights file that was at `recorded` (its training cache at `cache`)."""

    def change(blob):
        prov = json.loads(blob["provenance"])
        prov["weights"] = FILE_WEIGHTS
        blob["provenance"] = json.dumps(prov)
        blob["weights_path"], blob["weights_paths"] = recorded, [recorded]
        if cache is not None:
            blob["cache"] = cache

    return crafted_head(base, dst, change)




# ---------------------------------------------------------------- 2. predict's default cache through a planted link

@pytest.mark.parametrize("suffix", ["", ".lock", ".parts"], ids=["cache", "lock", "parts"])
def test_default_cache_never_follows_a_planted_link(cli, base, tmp_path, suffix):
    install(base)
    target = tmp_path / "elsewhere" / "deep" / "x.h5"  # does not exist yet: following would create it all
    (Path("cache") / (default_test_cache(base) + suffix)).symlink_to(target)
    t0 = time.perf_counter()
    refused(cli("predict", base.test, ok=False), "symbolic link")
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "elsewhere").exists()
    assert not Path("cache/predictions.csv").exists()


def test_explicit_cache_link_is_still_followed(cli, base, tmp_path):
    install(base)
    target = tmp_path / "big" / "test1.h5"
    target.parent.mkdir()
    Path("cache/mine.h5").symlink_to(target)
    cli("predict", base.test, "--cache", "cache/mine.h5", "--quiet")
    assert target.is_file() and Path("cache/mine.h5").is_symlink()
    assert not Path("cache/mine.h5.lock").exists() and not target.with_name("test1.h5.lock").exists()


# ---------------------------------------------------------------- 3. the demo in a folder someone else prepared

def _stop_after_drawing(monkeypatch):
    extract_mod = importlib.import_module("catdog_cache.engines.dispatch")  # the demo calls extract from there

    def stop(*a, **k):  # the demo drew its images into the folder: enough to see what it overwrote
        raise AssertionError("the demo claimed a folder it did not make")

    monkeypatch.setattr(extract_mod, "extract", stop)


def _prepared(tmp_path: Path, marker_uid: int | None) -> tuple[Path, Path]:
    victim = tmp_path / "victim.txt"
    victim.write_text("victim content")
    folder = tmp_path / "prepared"
    (folder / "data" / "train" / "cat").mkdir(parents=True)
    (folder / "data" / "train" / "cat" / "0.jpg").symlink_to(victim)
    marker = folder / ".catdog-demo"
    marker.write_text("made by catdog-cache demo; it reuses this folder and deletes nothing\n")
    if marker_uid is not None:
        os.chown(marker, marker_uid, marker_uid)
        os.chown(folder, marker_uid, marker_uid)
    return folder, victim


@pytest.mark.parametrize("owner", ["ours", "another-user"])
def test_demo_never_writes_through_a_prepared_folder(cli, tmp_path, monkeypatch, owner):
    if owner == "another-user" and os.geteuid() != 0:
        pytest.skip("making a file owned by another user needs root")
    _stop_after_drawing(monkeypatch)
    folder, victim = _prepared(tmp_path, 65534 if owner == "another-user" else None)
    r = cli("demo", "--backbone", "tiny", "--weights", "random", "--folder", folder, ok=False)
    assert victim.read_text() == "victim content"
    refused(r, "not made by the demo", "did not make")
    assert sorted(p.name for p in folder.iterdir()) == [".catdog-demo", "data"]  # nothing added


def test_demo_files_are_created_exclusively(tmp_path):
    from catdog_cache.demo import create_new, make_sample_set, new_folder
    from catdog_cache.errors import InputError

    victim = tmp_path / "victim.txt"
    victim.write_text("victim content")
    (tmp_path / "link.jpg").symlink_to(victim)
    create_new(tmp_path / "link.jpg", b"drawn")  # a link (even a dangling one) is never written through
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.txt")
    create_new(tmp_path / "dangling.jpg", b"drawn")
    assert victim.read_text() == "victim content" and not (tmp_path / "nowhere.txt").exists()
    root = tmp_path / "demo"
    (root / "data" / "train").mkdir(parents=True)
    (root / "data" / "train" / "dog").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "outside").mkdir()
    with pytest.raises(InputError, match="not a folder the demo made"):
        make_sample_set(root / "data", per_class=1, n_test=1)
    assert not any((tmp_path / "outside").iterdir())
    new_folder(root / "data" / "test", root)  # a plain folder is fine


# ---------------------------------------------------------------- 4. recorded paths are read like inputs

@pytest.mark.parametrize("name", ["self/pagemap", "kmsg"])
def test_recorded_weights_path_at_a_proc_file_returns_at_once(name):
    from catdog_cache.backbone import locate, spec_from_identity
    from catdog_cache.errors import InputError

    path = proc_file(name)
    spec = spec_from_identity(FILE_WEIGHTS, recorded_path=path)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="gone or not a weights file"):
        returns_within(lambda: locate(spec), seconds=5)
    assert time.perf_counter() - t0 < 1


@pytest.mark.parametrize("name", ["self/pagemap", "kmsg"])
def test_bounded_reads_of_proc_files_return_at_once(name):
    from catdog_cache.files import plausible_file, read_regular, sha256_regular

    path = proc_file(name)
    assert returns_within(lambda: read_regular(path, 1 << 30), seconds=5) == b""  # its size says 0: nothing read
    assert returns_within(lambda: sha256_regular(path, 1 << 30), seconds=5) == hashlib.sha256(b"").hexdigest()
    assert not plausible_file(path, 1 << 30)


def test_recorded_weights_path_is_no_content_oracle(cli, base, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    head = file_weights_head(base, tmp_path / "crafted.pt", str(secret))
    out = refused(cli("predict", base.test, "--head", head, ok=False), "not the file the head was trained with")
    assert hashlib.sha256(SECRET).hexdigest()[:12] not in out and hashlib.sha256(SECRET).hexdigest()[:8] not in out
    assert "abababababab" in out  # the recorded identity, from the head itself, is fine to show


def test_recorded_training_cache_at_kmsg_is_not_read(base, tmp_path):
    from catdog_cache.score.features import default_cache
    from catdog_cache.score.scorer import load_scorer

    kmsg = proc_file("kmsg")
    head = crafted_head(base, tmp_path / "crafted.pt", lambda blob: blob.update(cache=kmsg, caches=[kmsg]))
    loaded = load_scorer(head, backbone=False)
    t0 = time.perf_counter()
    got = returns_within(lambda: default_cache(loaded, head, base.test), seconds=5)
    assert got == tmp_path / default_test_cache(base) and time.perf_counter() - t0 < 1


# ---------------------------------------------------------------- 16. broken torchrun environments

@pytest.mark.parametrize(("env", "word"), [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT"),
], ids=["world-abc", "no-rank", "rank-5", "local-rank-x", "no-master-addr", "master-port-http"])
def test_broken_torchrun_environment_is_one_line(cli, base, monkeypatch, env, word):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    r = cli("extract", base.train, *TINY, "--quiet", ok=False)
    assert word in refused(r, word)
    assert not Path("cache/features.h5").exists()


# ---------------------------------------------------------------- 17. rich markup in paths

def test_demo_folder_with_markup_is_printed_as_is(cli, tmp_path, monkeypatch):
    import catdog_cache.demo as demo_mod

    folder = Path("dm[/x]")

    def fake_run(folder, weights, backbone, epochs, progress=None):  # the table, not the pipeline, is under test
        f = Path(folder)
        return SimpleNamespace(
            folder=f, weights="random", backbone="tiny", stages=dict.fromkeys(
                ("draw images", "extract", "fit", "predict", "preview"), 0.1),
            extract=SimpleNamespace(extracted=48, rows=48, cache=f / "features-[b]x[/b].h5"),
            fit=SimpleNamespace(history=[1], val_acc=1.0, val_log_loss=0.1, head_path=f / "h[/].pt",
                                curve=f / "c[/].png"),
            predict=SimpleNamespace(rows=[1] * 8, out=f / "predictions.csv"),
            preview=SimpleNamespace(shown=8, out=f / "preview[/x].png"))

    monkeypatch.setattr(demo_mod, "run_demo", fake_run)
    r = cli("demo", "--folder", folder, "--quiet")
    assert "dm[/x]" in r.output and "preview[/x].png" in r.output and "c[/].png" in r.output


# ---------------------------------------------------------------- smaller ones

@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """An ImageFolder with 3 good images and 12 that cannot be decoded: one named with a byte that is not UTF-8,
    one at the end of a 3,000-character path."""
    root = tmp_path_factory.mktemp("broken") / "data"
    draw(root / "cat" / "good.jpg", "cat", 1)
    draw(root / "dog" / "good.jpg", "dog", 2)
    draw(root / "dog" / "good2.jpg", "dog", 3)
    for i in range(10):
        (root / "cat" / f"bad{i:02d}.jpg").write_bytes(b"not a jpeg")
    with open(os.fsencode(root / "dog") + b"/caf\xe9.jpg", "wb") as fh:
        fh.write(b"not a jpeg either")
    deep = root / "cat" / "/".join(["d" * 200] * 15)
    deep.mkdir(parents=True)
    (deep / "deep.jpg").write_bytes(b"deep and broken")
    return root


def test_json_output_is_valid_utf8_and_recoverable(cli, broken):
    r = cli("extract", broken, *TINY, "--json")
    doc = json.loads(r.stdout)

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    for s in strings(doc):
        s.encode("utf-8")  # a lone surrogate (what --json wrote before) raises here
    names = [path for path, _ in doc["failed"] if "caf" in path]
    assert names == ["dog/caf\\xe9.jpg"]
    assert codecs.escape_decode(names[0].encode())[0] == b"dog/caf\xe9.jpg"


def test_failures_are_listed_and_skip_lines_shortened(cli, broken, tmp_path):
    r = cli("extract", broken, *TINY, "--cache", tmp_path / "b.h5")
    skips = [line for line in r.stderr.splitlines() if line.lstrip().startswith("skip")]
    assert len(skips) == 10 and max(map(len, skips)) < 400  # the 3,000-character path is cut in the middle
    assert "--failures` lists every one" in r.stderr
    info = cli("info", "--cache", tmp_path / "b.h5")
    assert "see `catdog-cache info`" not in info.output and "--failures lists every one" in info.output
    full = cli("info", "--cache", tmp_path / "b.h5", "--failures")
    listed = [line for line in full.stdout.splitlines() if line.startswith("failed ")]
    assert len(listed) == 12 and any("deep.jpg" in line and len(line) > 3000 for line in listed)
    doc = json.loads(cli("info", "--cache", tmp_path / "b.h5", "--failures", "--json").stdout)
    assert len(doc["failures"]) == 12 and {"source", "path", "sha256", "reason"} <= set(doc["failures"][0])


@pytest.mark.parametrize("args", [[], ["--json"]], ids=["table", "json"])
def test_closed_pipe_is_quiet(base, args):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head`) is already gone
    try:
        p = subprocess.run([sys.executable, "-m", "catdog_cache", "info", "--cache", str(base.cache), *args],
                           stdout=write, stderr=subprocess.PIPE, timeout=120, cwd=Path(__file__).parents[2])
    finally:
        os.close(write)
    assert p.stderr == b"" and p.returncode == 141, (p.returncode, p.stderr.decode())


def test_only_rank_0_prints_and_writes(cli, base, monkeypatch):
    install(base)
    cli("predict", base.test, "--quiet")  # features cached by a first, single-process run
    Path("cache/predictions.csv").unlink()
    monkeypatch.setenv("RANK", "1")  # what torchrun gives the second process
    r = cli("predict", base.test, "--submission", "cache/sub.csv")
    assert r.output == ""
    assert not Path("cache/predictions.csv").exists() and not Path("cache/sub.csv").exists()


def test_no_lock_file_outlives_its_run(cli, base, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cat.0.jpg").write_bytes(b"not a jpeg")
    refused(cli("extract", bad, *TINY, ok=False), "could be decoded")
    assert not Path("cache/features.h5").exists() and not Path("cache/features.h5.lock").exists()
    install(base, head=False)
    refused(cli("extract", base.train, "--backbone", "tiny", "--weights", "random", "--seed", "7", ok=False),
            "made differently")
    assert not Path("cache/features.h5.lock").exists()
    cli("extract", small_folder(tmp_path / "more"), *TINY, "--quiet")
    assert not Path("cache/features.h5.lock").exists()


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_ensemble_of_a_cache_and_its_own_link_is_refused(cli, base, link):
    install(base, head=False)
    (os.link if link == "hard" else os.symlink)(Path("cache/features.h5").resolve(), "cache/other.h5")
    refused(cli("fit", "--cache", "cache/features.h5", "--cache", "cache/other.h5", *FIT, ok=False), "twice")
    assert not Path("cache/features.head.pt").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_verify_tolerance_is_validated(cli, base, value):
    refused(cli("verify", base.train, *TINY, "--tolerance", value, ok=False), "--tolerance")


def test_csv_of_base_predict_is_unchanged(cli, base):
    install(base)
    cli("predict", base.test, "--quiet")
    assert [row[0] for row in read_csv("cache/predictions.csv")[1:]] == ["1.jpg", "2.jpg", "3.jpg"]
