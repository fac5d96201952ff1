"""Hostile files, round 4: a cache file that is a FIFO, a device or a /proc pseudo file, or becomes one between a
check and the open (items 11, 12); a weights file hashed and loaded as one read (item 1), refused by its recorded
size before it is hashed (item 14); control characters in every CSV cell (item 16). Every hostile input is built
here; the helpers are this file's own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch
from typer.testing import CliRunner

from catdog_cache.cli import app
from tests.conftest import TINY, draw
from tests.hostile.blocking import proc_file, returns_within

FIT = ["--epochs", "1", "--quiet"]
OSC52 = "\x1b]52;c;bw==\x07"  # would write "o" to the terminal's clipboard; lower case: folder names are lowered
ROOT = Path(__file__).resolve().parents[1]
NET = "mobilenet_v3_small"  # the smallest torchvision classifier: a real --weights FILE backbone, 10 MB


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(r, *any_of: str) -> str:
    """A user error: exit 1, one line, no traceback, and one of the expected words."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert "Traceback" not in r.output and len(lines) == 1, r.output
    assert any(word in r.output for word in any_of), r.output
    return r.output




def build(root: Path, *args: object) -> None:
    r = invoke(*args)
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real sharded cache and its head (4 cats + 4 dogs, TINY), and 3 unlabeled images. Read-only for tests."""
    root = tmp_path_factory.mktemp("base")
    train, test = root / "train", root / "test1"
    for i in range(4):
        draw(train / f"cat.{i}.jpg", "cat", i)
        draw(train / f"dog.{i}.jpg", "dog", 100 + i)
    for i in range(1, 4):
        draw(test / f"{i}.jpg", "cat" if i % 2 else "dog", 400 + i)
    cache, head = root / "cache" / "features.h5", root / "cache" / "features.head.pt"
    build(root, "extract", train, "--cache", cache, *TINY, "--quiet")
    build(root, "fit", "--cache", cache, *FIT)
    return SimpleNamespace(root=root, train=train, test=test, cache=cache, head=head)


def copy_cache(src: Path, dst: Path) -> Path:
    """A sharded cache moved as one: its index and its shards folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copytree(src.with_name(src.name + ".shards"), dst.with_name(dst.name + ".shards"))
    return dst


def default_test_cache(base) -> str:
    """The name predict gives base.test's features beside the head (folder name + provenance digest)."""
    from catdog_cache.cache import Provenance
    from catdog_cache.fit.head import load_head

    prov = Provenance.from_json(load_head(base.head)[1]["provenance"]).to_json()
    return f"test1.{hashlib.sha256(prov.encode()).hexdigest()[:8]}.h5"


# ---------------------------------------------------------------- 11. a FIFO where a cache is read

def _fifo_commands(base, fifo: Path) -> dict[str, list[object]]:
    return {"info": ["info", fifo],
            "fit": ["fit", "--cache", fifo, "--head", "h.pt", *FIT],
            "compact": ["compact", fifo],
            "extract": ["extract", base.train, "--cache", fifo, *TINY, "--quiet"],
            "predict --cache": ["predict", base.test, "--head", base.head, "--cache", fifo, "--out", "p.csv",
                                "--quiet"]}


@pytest.mark.parametrize("command", ["info", "fit", "compact", "extract", "predict --cache"])
def test_fifo_as_a_cache_is_refused_at_once(base, tmp_path, command):
    """Before: every one of these opened the FIFO for reading and waited for a writer, forever."""
    fifo = tmp_path / "features.h5"
    os.mkfifo(fifo)
    r = returns_within(lambda: invoke(*_fifo_commands(base, fifo)[command]), 60, unblock=fifo)
    out = refused(r, "FIFO")
    assert "features.h5" in out and "not a cache file" in out
    assert not Path("p.csv").exists() and not Path("h.pt").exists()


def test_fifo_at_predicts_default_cache_beside_a_shared_head(base, tmp_path):
    """A FIFO at the test-feature cache name beside a head in a shared folder (symlinks there are refused already).
    Before: predict took the cache's lock and waited on the FIFO forever, and every other predict with it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    head = Path(shutil.copy(base.head, shared / "features.head.pt"))
    fifo = shared / default_test_cache(base)
    os.mkfifo(fifo)
    for _ in range(2):  # the second finds the lock free: the first let go of it
        r = returns_within(lambda: invoke("predict", base.test, "--head", head, "--out", "p.csv", "--quiet"), 60,
                           unblock=fifo)
        assert fifo.name in refused(r, "FIFO")
    assert not Path("p.csv").exists()


SWAP_AFTER_LSTAT = r"""
import os, sys
from pathlib import Path
from catdog_cache.cache import open_cache
from catdog_cache.errors import CacheError

cache, shard, when = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real, swapped = os.lstat, []

def lstat(p, *a, **k):  # the shard becomes a FIFO right after the first lstat of it returns
    st = real(p, *a, **k)
    s = os.fspath(p)
    if not swapped and isinstance(s, str) and s.endswith(".shards/" + shard.name):
        swapped.append(s)
        os.rename(shard, shard.with_name("kept"))
        os.mkfifo(shard)
    return st

try:
    if when == "read":  # opened (every shard validated) before the swap; its features read after it
        with open_cache(cache) as (view, _):
            os.lstat = lstat
            view.read(0, view.rows, view=None)
    else:
        os.lstat = lstat
        with open_cache(cache):
            pass
except CacheError as e:
    print(e)
    sys.exit(3 if swapped else 4)
"""


@pytest.mark.parametrize("when", ["open", "read"])
def test_shard_swapped_for_a_fifo_after_its_check_is_refused(base, tmp_path, when):
    """The moment between a check of a shard's name (lstat) and an open of it, raced by someone with write access to
    the shards folder. `open`: the view validates each shard after an lstat (before: then opened it by name and
    waited); `read`: a reader reopens a shard after an lstat (before: h5py opened the FIFO, holding the GIL: the
    whole process froze). In a child process, killed if it blocks."""
    cache = copy_cache(base.cache, tmp_path / "c" / "features.h5")
    (shard,) = cache.with_name("features.h5.shards").glob("*.h5")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run([sys.executable, "-c", SWAP_AFTER_LSTAT, str(cache), str(shard), when], env=env,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"blocked on the FIFO put at {shard} for more than 60 s")
    assert r.returncode == 3 and shard.is_fifo(), (r.returncode, r.stdout, r.stderr[-2000:])
    assert shard.name in r.stdout and any(w in r.stdout for w in ("FIFO", "replaced", "changed")), r.stdout
    assert len(r.stdout.strip().splitlines()) == 1


# ---------------------------------------------------------------- 12. pseudo files are never read



@pytest.mark.parametrize("name", ["self/status", "kmsg"])
def test_pseudo_file_as_a_cache_is_not_read(name):
    """`info /proc/kmsg` read it (and blocked once it was dry; as root each read also takes the messages away from
    the system log). Now a cache is read no further than its size, and this one says 0 bytes."""
    path = proc_file(name)
    for args in (["info", path], ["fit", "--cache", path, "--head", "h.pt", *FIT]):
        r = returns_within(lambda args=args: invoke(*args), 30)
        assert "0 bytes" in refused(r, "pseudo file")


@pytest.mark.parametrize("what", ["socket", "character device"])
def test_socket_or_device_as_a_cache_is_named(tmp_path, what):
    import socket

    if what == "socket":
        path = tmp_path / "features.h5"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    else:
        path = Path("/dev/zero")
    assert f"is a {what}" in refused(invoke("info", path), what)


# ---------------------------------------------------------------- 1. weights read once

@pytest.fixture(scope="module")
def weights_base(base, tmp_path_factory):
    """A cache and head of a real --weights FILE backbone (a seeded mobilenet_v3_small state dict). Tests that swap
    the weights file put it back."""
    from torchvision.models import get_model

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(get_model(NET, weights=None).state_dict(), root / "w.pth")
    cache, head = root / "cache" / "features.h5", root / "cache" / "features.head.pt"
    build(root, "extract", base.train, "--cache", cache, "--backbone", NET, "--weights", root / "w.pth", "--quiet")
    build(root, "fit", "--cache", cache, *FIT)
    return SimpleNamespace(root=root, weights=root / "w.pth", cache=cache, head=head)


def other_weights(path: Path, seed: int = 1) -> Path:
    from torchvision.models import get_model

    torch.manual_seed(seed)
    torch.save(get_model(NET, weights=None).state_dict(), path)
    return path


def test_weights_are_hashed_and_loaded_from_one_read(weights_base, tmp_path):
    """Before: hashed by path, then loaded by path again, so a file replaced in between was loaded while the cache
    recorded the first one's hash (Ray actors build through the same code)."""
    from catdog_cache.backbone import build, parse_weights
    from catdog_cache.errors import InputError

    path = Path(shutil.copy(weights_base.weights, tmp_path / "w.pth"))
    spec = parse_weights(str(path))
    want = torch.load(path, weights_only=True)
    model = build(spec, NET)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)
    other_weights(tmp_path / "b.pth")
    os.replace(tmp_path / "b.pth", path)  # a valid state dict of the same network, after the hash
    with pytest.raises(InputError, match="changed since it was checked"):
        build(spec, NET)


# ---------------------------------------------------------------- 14. weights refused by size

def test_weights_identity_records_the_size(weights_base):
    from catdog_cache.cache import read_index

    size = weights_base.weights.stat().st_size
    sha = hashlib.sha256(weights_base.weights.read_bytes()).hexdigest()
    assert read_index(weights_base.cache).provenance.weights == f"file:sha256={sha},size={size}"


class Swapped:
    """The weights file at its recorded path replaced by a 16 GiB sparse file (a path to a big file); put back."""

    def __init__(self, path: Path) -> None:
        self.path, self.kept = path, path.with_name(path.name + ".kept")

    def __enter__(self) -> Path:
        os.rename(self.path, self.kept)
        with open(self.path, "wb") as fh:
            fh.truncate(16 << 30)
        return self.path

    def __exit__(self, *exc) -> None:
        os.replace(self.kept, self.path)


def _no_reads_of(mp: pytest.MonkeyPatch, path: Path) -> None:
    """Any read of `path` fails the test at once (before: the 16 GiB were hashed, 50-90 s)."""
    real = os.read

    def read(fd, n):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(path):
            raise AssertionError(f"{path} was read")
        return real(fd, n)

    mp.setattr(os, "read", read)


@pytest.mark.parametrize("command", ["predict", "extract"])
def test_recorded_weights_path_of_another_size_is_refused_before_hashing(base, weights_base, tmp_path, command):
    """predict: the head's recorded path (backbone.locate); extract: the cache's (appending without --weights)."""
    head = Path(shutil.copy(weights_base.head, tmp_path / "h.pt"))  # its test-feature cache goes here, not there
    cache = copy_cache(weights_base.cache, tmp_path / "c" / "features.h5")
    more = tmp_path / "more"
    draw(more / "cat.9.jpg", "cat", 9)
    with Swapped(weights_base.weights) as big, pytest.MonkeyPatch.context() as mp:
        _no_reads_of(mp, big)
        t0 = time.perf_counter()
        if command == "predict":
            out = refused(invoke("predict", base.test, "--head", head, "--out", "p.csv", "--quiet"),
                          "not the file the head was trained with", "not a weights file up to 4 GiB")
        else:
            out = refused(invoke("extract", more, "--cache", cache, "--quiet"), "is not that file now")
        assert time.perf_counter() - t0 < 30
    assert str(weights_base.weights) in out and "Traceback" not in out


def _without_size(text: str) -> str:
    prov = json.loads(text)
    prov["weights"] = prov["weights"].partition(",size=")[0]
    return json.dumps(prov, sort_keys=True)


def test_caches_and_heads_recorded_without_a_size_still_work(base, weights_base, tmp_path):
    """Caches and heads written before sizes were recorded: their weights file is found by hashing, as before, and
    their provenance equals a sized one (an append to such a cache adds sized shards to it)."""
    from catdog_cache.cache import read_index

    cache = copy_cache(weights_base.cache, tmp_path / "c" / "features.h5")
    for p in [cache, *cache.with_name("features.h5.shards").glob("*.h5")]:
        with h5py.File(p, "r+") as f:
            f.attrs["provenance"] = _without_size(f.attrs["provenance"])
    blob = torch.load(weights_base.head, map_location="cpu", weights_only=True)
    blob["provenance"] = _without_size(blob["provenance"])
    torch.save(blob, tmp_path / "old.pt")
    assert ",size=" not in read_index(cache).provenance.weights
    more = tmp_path / "more"
    draw(more / "dog.9.jpg", "dog", 9)
    assert invoke("extract", more, "--cache", cache, "--quiet").exit_code == 0
    assert read_index(cache).shape[0] == 9
    r = invoke("predict", base.test, "--head", tmp_path / "old.pt", "--out", "p.csv", "--quiet")
    assert r.exit_code == 0, r.output  # its backbone rebuilt from the file found by its sha256 alone
    assert len(Path("p.csv").read_text().splitlines()) == 4


# ---------------------------------------------------------------- 16. control characters in CSV cells

def test_csv_cell_escapes_control_characters_and_keeps_round_trips():
    from catdog_cache.files import csv_cell

    assert csv_cell(f"cat{OSC52}") == "cat\\x1b]52;c;bw==\\x07"
    assert csv_cell("a\rb\tc\x9b2J\u202e") == "a\\rb\\tc\\x9b2J\\u202e"
    assert csv_cell("new\nline.jpg") == "new\nline.jpg"  # quoted by the csv module: round-trips
    raw = os.fsdecode(b"raw\xff.jpg")
    assert csv_cell(raw) == raw  # written back as the byte it was
    assert csv_cell("=1+2") == "'=1+2" and csv_cell("plain") == "plain"


def test_control_characters_from_a_head_or_folder_never_reach_the_csv(base, tmp_path):
    """Class names from a head (and the labeled folder named after them) and file names with ESC/BEL: escaped in
    the header (p_<class>), the label and true_label columns and the path column. Before: written raw, and
    `cat predictions.csv` set the terminal's clipboard."""
    hostile = f"cat{OSC52}"
    blob = torch.load(base.head, map_location="cpu", weights_only=True)
    blob["classes"] = [hostile, "dog"]
    torch.save(blob, tmp_path / "head.pt")
    data = tmp_path / "labeled"
    for folder, name, image in ((hostile, "x\x1b[2J.jpg", "1.jpg"), ("dog", "y.jpg", "2.jpg")):
        (data / folder).mkdir(parents=True)
        shutil.copy(base.test / image, data / folder / name)
    r = invoke("predict", data, "--head", tmp_path / "head.pt", "--out", tmp_path / "p.csv", "--quiet")
    assert r.exit_code == 0, r.output
    raw = (tmp_path / "p.csv").read_bytes()
    assert not any(c in raw for c in (b"\x1b", b"\x07", b"\r")), raw
    text = raw.decode()
    header = text.splitlines()[0]
    assert header.startswith("path,p_cat\\x1b]52;c;bw==\\x07,p_dog,label") and "true_label" in header
    assert "\\x1b[2J.jpg" in text and text.count("cat\\x1b]52;c;bw==\\x07") >= 2  # header + true_label
