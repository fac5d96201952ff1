"""Ctrl-C and kill -9 midway, on every engine (local, Ray, torchrun) and source (a folder, tar shards): the cache
left behind is one `info` describes (the saved units listed in the index, the unfinished input marked incomplete),
and the next run finishes it with the rows a one-process run makes, every (source, path) once.

Each run to interrupt is a real `extract` process (Ray: with the local Ray it starts; torchrun: two ranks), slowed by
the CATDOG_BATCH_DELAY hook and stopped once a unit is saved: SIGINT to its process group as a terminal's Ctrl-C,
or SIGKILL to it and everything it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from catdog_cache.backbone import parse_weights
from catdog_cache.cache import list_parts, listed, parts_dir, read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.markers import markers_dir
from tests.conftest import TINY, draw, jpeg
from tests.extract.test_tars import make_tar

ARGS = [*TINY, "--workers", "0", "--batch-size", "2", "--part-rows", "2", "--device", "cpu", "--quiet"]
CFG = ExtractConfig(weights=parse_weights("random", 0), backbone="tiny", batch_size=2, workers=0, device="cpu",
                    part_rows=2)
RAY = {"folder": ["--engine", "ray", "--shard-size", "4", "--actors", "1"],
       "tars": ["--engine", "ray", "--actors", "1"]}
NO_RAY = "Ray is not installed (pip install 'catdog-cache[ray]')"
needs_ray = pytest.mark.skipif(find_spec("ray") is None, reason=NO_RAY)
CASES = [("local", "folder"), ("local", "tars"), pytest.param("ray", "folder", marks=needs_ray),
         pytest.param("ray", "tars", marks=needs_ray), ("torchrun", "folder")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A folder of 16 images and a broken file; 4 tar shards of 4 images, one member not an image."""
    base = tmp_path_factory.mktemp("inputs")
    folder = base / "data"
    for i in range(8):
        draw(folder / "cat" / f"{i}.jpg", "cat", i)
        draw(folder / "dog" / f"{i}.jpg", "dog", 500 + i)
    (folder / "dog" / "broken.jpg").write_bytes(b"no")
    for s in range(4):
        members = [(f"{kind}.{s}{i}.jpg", jpeg(kind, 10 * s + i + 500 * (kind == "dog"), base / "drawn"))
                   for i in range(2) for kind in ("cat", "dog")]
        make_tar(base / "shards" / f"t-{s}.tar", members + ([("dog.99.jpg", b"not a jpeg")] if s == 2 else []))
    return {"folder": str(folder), "tars": str(base / "shards" / "t-{0..3}.tar")}


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict[str, Path]:
    """One process, never interrupted: what every finished cache must hold."""
    out = tmp_path_factory.mktemp("refs")
    for source, spec in inputs.items():
        extract(spec, out / f"{source}.h5", CFG)
    return out


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason=NO_RAY)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def command(engine: str, source: str, spec: str, cache: Path) -> list[str]:
    args = ["-m", "catdog_cache", "extract", spec, "--cache", str(cache), *ARGS,
            *(RAY[source] if engine == "ray" else [])]
    if engine == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return [sys.executable, *args]


def start(engine: str, source: str, spec: str, cache: Path) -> subprocess.Popen:
    """A slowed extract in a session of its own (so that everything it starts can be found and stopped)."""
    return subprocess.Popen(command(engine, source, spec, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env(), "CATDOG_BATCH_DELAY": "0.3"}, start_new_session=True)


def saved_units(engine: str, source: str, cache: Path) -> list[Path]:
    """What a unit leaves when it is saved: a tar shard's or a Ray input shard's done marker, else a cache shard."""
    if source == "tars" or engine == "ray":  # one marker folder for every kind of unit
        folder, pattern = markers_dir(cache), "*.json"
    else:
        folder, pattern = parts_dir(cache), "*.h5"
    return list(folder.glob(pattern)) if folder.is_dir() else []


def env() -> dict[str, str]:
    """This checkout first on the subprocesses' path (the package may be installed from another one)."""
    here = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}


def wait_for_a_unit(proc: subprocess.Popen, engine: str, source: str, cache: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not saved_units(engine, source, cache):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_all(proc)
            _, err = proc.communicate()
            raise AssertionError(f"no unit saved (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.02)


def family(root: int) -> set[int]:
    """`root`'s descendants (torchrun's ranks start sessions of their own) and its session (Ray's processes)."""
    parents: dict[int, int] = {}
    sessions: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(name)], sessions[int(name)] = int(fields[1]), int(fields[3])
    found = {pid for pid, sid in sessions.items() if sid == root} | {root}
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found - {root}


def kill_all(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL the process (while it runs), then everything it started; wait until they are gone, so that nothing of
    a test outlives it or writes into the next run."""
    others = family(proc.pid)
    if proc.poll() is None:
        proc.kill()
    for pid in sorted(others):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in others):
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rerun(engine: str, source: str, spec: str, cache: Path, cli, request) -> None:
    """The next run, on the same engine; Ray's in this process, on the module's Ray."""
    if engine == "torchrun":
        r = subprocess.run(command(engine, source, spec, cache), capture_output=True, text=True, timeout=300, env=env())
        assert r.returncode == 0, r.stderr[-2000:]
        return
    if engine == "ray":
        request.getfixturevalue("ray")
    cli("extract", spec, "--cache", cache, *ARGS, *(RAY[source] if engine == "ray" else []))


def rows(cache: Path) -> dict[tuple[str, bytes], tuple[int, np.ndarray]]:
    """(source, path) -> (label, features), after checking that no (source, path) is listed twice."""
    idx, feats = read_index(cache), read_features(cache)
    keys = [(idx.sources[s], p) for s, p in zip(idx.source.tolist(), idx.paths, strict=True)]
    assert len(set(keys)) == len(keys), [k for k, n in Counter(keys).items() if n > 1][:3]
    return {k: (int(label), f) for k, label, f in zip(keys, idx.labels.tolist(), feats, strict=True)}


def assert_finished(cache: Path, reference: Path) -> None:
    got, want = rows(cache), rows(reference)
    assert sorted(got) == sorted(want)
    for k, (label, f) in want.items():
        assert got[k][0] == label
        np.testing.assert_allclose(got[k][1], f, atol=1e-5)
    idx, ref = read_index(cache), read_index(reference)
    assert sorted((idx.sources[s], p, why) for s, p, _, why in idx.failed) == \
        sorted((ref.sources[s], p, why) for s, p, _, why in ref.failed)
    assert idx.incomplete == [] and list_parts(cache, clean=False) == []


def assert_done_units_listed(engine: str, source: str, cache: Path) -> None:
    """Every unit whose done marker is on disk is in the index whole; one process lists every shard it wrote."""
    idx = read_index(cache)
    names = set(listed(cache)[1].names)
    if source == "tars":
        per_source = Counter(idx.sources[s] for s in idx.source.tolist())
        for m in markers_dir(cache).glob("*.json"):
            marker = json.loads(m.read_text())
            assert per_source[marker["source"]] == marker["rows"]
    elif engine == "ray":
        for m in markers_dir(cache).glob("*.json"):
            part = json.loads(m.read_text())["part"]
            assert not part or f"{part}.h5" in names
    if engine == "local":
        assert list_parts(cache, clean=False) == []


def unfinished_tars(cache: Path, spec: str) -> list[str]:
    from catdog_cache.sources.spec import resolve_inputs

    done = {json.loads(m.read_text())["source"] for m in markers_dir(cache).glob("*.json")}
    return sorted(set(resolve_inputs(spec)) - done)


@pytest.mark.parametrize(("engine", "source"), CASES)
def test_ctrl_c_leaves_a_described_cache_and_the_rerun_finishes(engine, source, inputs, references, tmp_path, cli,
                                                                 request):
    spec, cache = inputs[source], tmp_path / "c.h5"
    proc = start(engine, source, spec, cache)
    try:
        wait_for_a_unit(proc, engine, source, cache)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group (Ray's processes too)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_all(proc)  # leftovers only (Ray's agents may outlive a driver)
    # Ray's own lines ("(raylet) Task FolderActor.run failed...", coloured) stay out of a piped output
    assert "\x1b" not in out + err and "(raylet)" not in out + err, (out + err)[-2000:]
    # torchrun's launcher exits 1 with its own traceback; its ranks, as every other extract, say what was saved
    assert proc.returncode == (1 if engine == "torchrun" else 130), err[-2000:]
    assert "interrupted: " in err and "saved to" in err and "run extract again to resume" in err, err[-2000:]
    info = json.loads(cli("info", cache, "--json").output)
    assert info["rows"] > 0 and (info["unassembled_parts"] == 0 or engine != "local"), info
    expected = [str(Path(spec).resolve())] if source == "folder" else unfinished_tars(cache, spec)
    assert info["incomplete"] == expected and expected, info
    assert_done_units_listed(engine, source, cache)
    rerun(engine, source, spec, cache, cli, request)
    assert_finished(cache, references / f"{source}.h5")


@pytest.mark.parametrize(("engine", "source"), CASES)
def test_kill_9_midway_then_the_rerun_finishes(engine, source, inputs, references, tmp_path, cli, request):
    spec, cache = inputs[source], tmp_path / "c.h5"
    proc = start(engine, source, spec, cache)
    try:
        wait_for_a_unit(proc, engine, source, cache)
    finally:
        kill_all(proc)  # the driver (or torchrun's launcher) first, then its Ray or its ranks
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not cache.exists()  # a new cache's index is written last: the saved units wait as shards and markers
    rerun(engine, source, spec, cache, cli, request)
    assert_finished(cache, references / f"{source}.h5")
