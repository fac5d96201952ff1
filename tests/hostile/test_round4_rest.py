"""Hardening round 4, the leftovers: a head that is not a regular file (or becomes one's replacement), a recorded
weights file far larger than any backbone's, and markers of caches made before weights files recorded their size."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import h5py
import pytest
import torch

from catdog_cache.cache.format import weights_key
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import CacheError
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.markers import markers_dir, tar_identity, tar_unit
from catdog_cache.fit.head import load_head
from catdog_cache.sources.spec import identity
from tests.conftest import draw
from tests.extract.test_tars import make_tar
from tests.hostile import test_hostile_files as shared
from tests.hostile.test_hostile_files import Swapped, copy_cache, invoke, refused

base, weights_base = shared.base, shared.weights_base  # their module-scoped fixtures: a cache, a --weights FILE head


def test_a_fifo_as_head_is_named_in_one_line(cli, tmp_path):
    fifo = tmp_path / "head.pt"
    os.mkfifo(fifo)
    with pytest.raises(CacheError, match=r"is a FIFO \(named pipe\), not a head file"):
        load_head(fifo)
    result = cli("info", fifo, ok=False)
    assert result.exit_code == 1 and "FIFO" in result.output and "Traceback" not in result.output


def test_a_fifo_swapped_in_after_the_check_never_hangs(tmp_path, monkeypatch):
    """The old load_head checked the name (is_file) and then opened it by name, several times: a FIFO put there
    in between blocked the open for good. Simulated: every name check says "a regular file"."""
    fifo = tmp_path / "head.pt"
    os.mkfifo(fifo)
    monkeypatch.setattr(Path, "is_file", lambda self: True)
    monkeypatch.setattr(Path, "is_dir", lambda self: False)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_head(fifo)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():  # the old code: blocked in open(); a writer releases it so the test run can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_head blocked on a FIFO")
    assert isinstance(outcome[0], CacheError) and "FIFO" in str(outcome[0])


def test_markers_of_a_cache_from_before_weights_sizes_still_match(tmp_path, images, opened):
    """A cache made with --weights FILE before the file's size was recorded: its markers digest the provenance
    without `,size=N`, a run now has it. The old code redid every tar once (and every tar of every append)."""
    torchvision = pytest.importorskip("torchvision")
    from catdog_cache.backbone import parse_weights

    torch.manual_seed(0)
    weights = tmp_path / "m.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
    cfg = ExtractConfig(weights=parse_weights(str(weights)), backbone="mobilenet_v3_small", workers=0,
                        batch_size=4)
    names = sorted(images)[:4]
    shard = str(make_tar(tmp_path / "s.tar", [(n, images[n]) for n in names]))
    cache = tmp_path / "c.h5"
    extract(shard, cache, cfg)
    prov = cfg.provenance()
    assert ",size=" in prov.weights
    marker = markers_dir(cache) / f"{tar_unit(shard)}.json"
    data = json.loads(marker.read_text())
    data["identity"] = tar_identity(shard, identity(shard), replace(prov, weights=weights_key(prov.weights)).to_json())
    marker.write_text(json.dumps(data))  # as that catdog-cache wrote it
    opened.clear()
    r = extract(shard, cache, cfg)
    assert (r.reused, r.extracted, opened) == (4, 0, [])


def _sized(text: str, size: int) -> str:
    prov = json.loads(text)
    prov["weights"] = f"{prov['weights'].partition(',size=')[0]},size={size}"
    return json.dumps(prov, sort_keys=True)


@pytest.mark.parametrize("command", ["predict", "extract"])
def test_a_recorded_weights_path_to_a_huge_file_of_its_true_size_is_not_hashed(base, weights_base, tmp_path,
                                                                               command):
    """A crafted head (or cache) that records the weights path with that file's true size (16 GiB, sparse): the
    size check passes, and the old code hashed all 16 GiB (50-90 s) before saying it was not the file. A path
    that a file from outside names is read only up to MAX_RECORDED_WEIGHTS_BYTES: refused unread."""
    from catdog_cache.backbone import MAX_RECORDED_WEIGHTS_BYTES

    assert MAX_RECORDED_WEIGHTS_BYTES < 16 << 30
    blob = torch.load(weights_base.head, map_location="cpu", weights_only=True)
    blob["provenance"] = _sized(blob["provenance"], 16 << 30)
    torch.save(blob, tmp_path / "h.pt")
    cache = copy_cache(weights_base.cache, tmp_path / "c" / "features.h5")
    for p in [cache, *cache.with_name("features.h5.shards").glob("*.h5")]:
        with h5py.File(p, "r+") as f:
            f.attrs["provenance"] = _sized(f.attrs["provenance"], 16 << 30)
    more = tmp_path / "more"
    draw(more / "cat.9.jpg", "cat", 9)
    with Swapped(weights_base.weights) as big, pytest.MonkeyPatch.context() as mp:
        shared._no_reads_of(mp, big)
        t0 = time.perf_counter()
        if command == "predict":
            out = refused(invoke("predict", base.test, "--head", tmp_path / "h.pt", "--out", "p.csv", "--quiet"),
                          "up to 4 GiB")
        else:
            out = refused(invoke("extract", more, "--cache", cache, "--quiet"), "at most 4 GiB")
        assert time.perf_counter() - t0 < 30
    assert str(weights_base.weights) in out and "--weights FILE" in out
