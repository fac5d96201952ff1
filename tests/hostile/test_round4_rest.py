"""Hardening round 4, the leftovers: a head that is not a regular file (or becomes one's replacement), a recorded
weights file far larger than any backbone's, and markers of caches made before weights files recorded their size."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from catdog_cache.cache.format import weights_key
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import CacheError
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.markers import markers_dir, tar_identity, tar_unit
from catdog_cache.fit.head import load_head
from catdog_cache.sources.spec import identity
from tests.extract.test_tars import make_tar


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
    torch = pytest.importorskip("torch")
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
