"""The overlapped extract pipeline: rows bit-identical to the serial path, the writer thread, and thread and worker
counts."""

import importlib
import threading

import numpy as np
import pytest
import torch

from catdog_cache.backbone import WeightsSpec, build
from catdog_cache.cache import list_parts, read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import CatdogError
from catdog_cache.extract import loader as pipeline
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.sources.decode import decode_rgb, views_of

extract_mod = importlib.import_module("catdog_cache.extract.folder")


def serial_features(root, rels, cfg):
    """Today's semantics, written out serially: decode + the preset per file, the batch stacked, flattened and made
    channels-last, one forward per batch, back to the host. The pipeline must give these rows bit for bit."""
    bb = cfg.resolve()
    model = build(cfg.weights, cfg.backbone).to(memory_format=torch.channels_last)
    transform = bb.preset.transform()
    out = []
    for s in range(0, len(rels), cfg.batch_size):
        x = torch.stack([views_of(decode_rgb((root / r).read_bytes()), cfg.views, transform)
                         for r in rels[s:s + cfg.batch_size]])  # [B, V, 3, 224, 224]
        b, v = x.shape[:2]
        with torch.inference_mode():
            y = model(x.flatten(0, 1).to(memory_format=torch.channels_last))  # [B*V, D]
        out.append(y.float().reshape(b, v, -1).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize(("workers", "threads"), [(0, 2), (2, 1)])
def test_rows_bit_identical_to_the_serial_path(tmp_path, kaggle_dir, monkeypatch, workers, threads):
    """Same settings, same bits. The intra-op thread count is one of the settings: like the machine, it can move
    the last bits of a convolution (3e-7 on this batch), so both sides run on the same count."""
    monkeypatch.setenv("CATDOG_EXTRACT_THREADS", str(threads))
    cfg = ExtractConfig(weights=WeightsSpec("random", seed=3), backbone="tiny", workers=workers, batch_size=5,
                        views=("center", "flip"), part_rows=4)  # several parts, a short last batch
    extract(kaggle_dir, tmp_path / "c.h5", cfg)
    rels = [p.decode() for p in read_index(tmp_path / "c.h5").paths]
    assert rels == sorted(p.name for p in kaggle_dir.iterdir())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = serial_features(kaggle_dir, rels, cfg)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(read_features(tmp_path / "c.h5", view=None), want)


def test_collate_lays_batches_out_channels_last():
    items = [(i, torch.rand(2, 3, 8, 8), f"{i:064d}", "") for i in range(3)] + [(3, None, "", "bad")]
    x, idx, shas, failed = pipeline.collate(items)
    assert x.shape == (3, 2, 3, 8, 8) and idx == [0, 1, 2] and failed == [(3, "", "bad")]
    flat = x.flatten(0, 1)  # a view: the forward's input needs no copy
    assert flat.is_contiguous(memory_format=torch.channels_last) and flat.data_ptr() == x.data_ptr()
    assert torch.equal(x, torch.stack([t for _, t, _, _ in items[:3]]))


def test_writer_writes_parts_off_the_caller_thread_and_reports_its_error():
    seen, threads = [], []

    def write(batches):
        threads.append(threading.current_thread())
        seen.append(sum(len(b[0]) + len(b[3]) for b in batches))

    w = pipeline.PartWriter(write, rows=4, seconds=1e9)
    for i in range(5):
        w.put(([i, i], np.zeros((2, 1, 3)), ["", ""], [(9, "", "bad")] if i == 4 else []))
    w.close()
    assert seen == [4, 4, 3] and threading.current_thread() not in threads

    def fail(batches):
        raise OSError("disk full")

    w = pipeline.PartWriter(fail, rows=1, seconds=1e9)
    w.put(([0], np.zeros((1, 1, 3)), [""], []))
    with pytest.raises(OSError, match="disk full"):
        for _ in range(50):  # raised by a later put() (the queue never blocks on a dead writer) or by close()
            w.put(([0], np.zeros((1, 1, 3)), [""], []))
        w.close()
    w.close()  # raised once


def test_a_failing_part_write_stops_extract_with_its_error(tmp_path, kaggle_dir, monkeypatch):
    def full(*args, **kwargs):
        raise CatdogError("no space left for the part")

    monkeypatch.setattr(extract_mod, "write_part", full)
    cfg = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0, batch_size=2, part_rows=2)
    with pytest.raises(CatdogError, match="no space left"):
        extract(kaggle_dir, tmp_path / "c.h5", cfg)
    assert list_parts(tmp_path / "c.h5") == []


def test_interrupt_saves_every_batch_received(tmp_path, kaggle_dir, monkeypatch):
    """Ctrl-C in the loop: the writer writes what it holds, the parts are assembled, the message counts them."""
    from catdog_cache.errors import Interrupted

    real = extract_mod.run_features

    def interrupted(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(extract_mod, "run_features", interrupted)
    cfg = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0, batch_size=2, part_rows=100)
    with pytest.raises(Interrupted, match="6 images saved"):
        extract(kaggle_dir, tmp_path / "c.h5", cfg)
    assert read_index(tmp_path / "c.h5").shape[0] == 6


def test_threads_leave_the_workers_their_cores(monkeypatch):
    monkeypatch.delenv("CATDOG_EXTRACT_THREADS", raising=False)
    monkeypatch.setattr(pipeline, "cores", lambda: 16)
    assert pipeline.default_workers(1000) == 15 and pipeline.default_workers(10) == 0
    assert pipeline.extract_threads(15) == 1 and pipeline.extract_threads(0) == 16 and pipeline.extract_threads(4) == 12
    monkeypatch.setattr(pipeline, "cores", lambda: 1)
    assert pipeline.default_workers(1000) == 1 and pipeline.extract_threads(1) == 1
    monkeypatch.setenv("CATDOG_EXTRACT_THREADS", "3")
    assert pipeline.extract_threads(1) == 3


def test_cores_are_shared_among_local_ranks(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = pipeline.cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert pipeline.cores() == max(1, alone // 2)


def test_forward_runs_on_the_chosen_threads_and_they_are_restored(tmp_path, kaggle_dir, monkeypatch):
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build(WeightsSpec("random"), "tiny")

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return self.inner(x)

    monkeypatch.setenv("CATDOG_EXTRACT_THREADS", "1")
    before = torch.get_num_threads()
    extract(kaggle_dir, tmp_path / "c.h5", ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0,
                                                          batch_size=4), model=Recording())
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
