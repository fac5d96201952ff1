"""How extract splits a CPU's cores between decoding and the forward (issue 33, item 2): the work model, the
pacer's search, the gate that keeps loader workers off the forward's cores; bf16 capability and --precision auto
(item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catdog_cache.backbone import WeightsSpec
from catdog_cache.cache import read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract import forward, pacing, precision
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.pacing import Gate, Pacer, Setting, rate, split


def test_rate_model_and_the_split_it_chooses():
    """rate(t) = min(1 / w_t, cores / (d + t * w_t)) in images per ms x 1000; the split follows the costs."""
    assert rate(2, 5.0, 13.0, 2) == pytest.approx(1e3 * 2 / (5 + 26))  # bound: both stages share both cores
    assert rate(2, 5.0, 26.0, 1) == pytest.approx(1e3 / 26)  # the single forward thread is the limit
    assert rate(2, 5.0, 26.0, 1, workers=0) == pytest.approx(1e3 / 31)  # decoding in process, in turn
    assert pacing.bound(2, 5.0, 26.0) == pytest.approx(1e3 * 2 / 31)
    # resnet18-like, forward scales: all cores to the forward, the workers decode while it waits
    assert split(2, 5.0, {2: 13.5, 1: 26.0}) == 2
    # the forward scales poorly but decoding is cheap: two threads still win
    assert split(2, 5.0, {2: 20.0, 1: 26.0}) == 2
    # it barely scales: one thread, a worker decodes on the other core
    assert split(2, 5.0, {2: 24.0, 1: 26.0}) == 1
    # a busy neighbour stalls two threads at every barrier: one thread
    assert split(2, 5.0, {2: 60.0, 1: 30.0}) == 1
    # decoding dominates (a tiny network, big JPEGs): the forward's core-ms are what the decoders lose
    assert split(2, 20.0, {2: 2.0, 1: 3.0}) == 1
    assert split(16, 5.0, {16: 2.0, 8: 2.1, 4: 4.0, 2: 8.0, 1: 16.0}) == 8  # 16 threads stall often
    assert pacing.thread_counts(16) == [16, 8, 4, 2, 1] and pacing.thread_counts(6) == [6, 3, 1]
    assert pacing.thread_counts(1) == [1] and pacing.chunk_sizes(16) == [16, 8, 4] and pacing.chunk_sizes(6) == [6]


def drive(p: Pacer, cost, n: int, batch: int = 16) -> list[Setting]:
    """Run the pacer for n batches whose forward costs cost(setting, i) wall-ms per image; the settings used."""
    used = []
    for i in range(n):
        s = p.next()
        used.append(s)
        p.record(s, batch, cost(s, i) * batch / 1e3)
    return used


def test_pacer_measures_then_keeps_the_best_and_follows_a_change_of_load():
    table = {(2, 16): 14.0, (1, 16): 26.0, (2, 8): 12.0, (1, 8): 25.0, (2, 4): 13.0, (1, 4): 24.0}
    p = Pacer(cores=2, batch=16, workers=2, every=32)
    p.decode_ms = 5.0
    used = drive(p, lambda s, i: table[s.threads, s.chunk], 40)
    # set-up batch, thread counts twice interleaved, chunk 8 (set-up + measured), chunk 4 (set-up + measured)
    assert used[:9] == [Setting(1, 16), Setting(2, 16), Setting(1, 16), Setting(2, 16), Setting(1, 16)] + \
        [Setting(2, 8)] * 2 + [Setting(2, 4)] * 2
    assert p.best == Setting(2, 8) and used[9:32] == [Setting(2, 8)] * 23
    assert used[32] == Setting(1, 8)  # every 32 batches, the other thread counts again
    # a neighbour arrives: two threads now stall; the next re-measurement moves to one
    p2 = Pacer(cores=2, batch=16, workers=2, every=8)
    p2.decode_ms = 5.0
    drive(p2, lambda s, i: table[s.threads, s.chunk] * (5 if i >= 12 and s.threads == 2 else 1), 40)
    assert p2.best.threads == 1
    forced = Pacer(cores=2, batch=16, workers=2, forced=1)
    assert {s.threads for s in drive(forced, lambda s, i: table[s.threads, s.chunk], 40)} == {1}


def test_gate_closes_the_workers_beyond_the_free_cores():
    g = Gate(workers=3, cores=2)
    with g.forward(2):
        assert [e.is_set() for e in g.open] == [False, False, False]
    with g.forward(1):
        assert [e.is_set() for e in g.open] == [True, False, False]
    assert all(e.is_set() for e in g.open) and g.decode_ms() == 0.0
    pacing.attach(g, 1)
    try:
        with pacing.decoding():
            sum(range(100_000))
    finally:
        pacing.attach(None, 0)
    assert g.meter[3] == 1 and g.decode_ms() > 0


def test_cpu_extract_paces_its_workers_and_matches_in_process(tmp_path, kaggle_dir):
    """Two gated loader workers: the pacer ran, metered their decoding, and the rows equal an in-process run."""
    cfg = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", device="cpu", workers=2, batch_size=2)
    extract(kaggle_dir, tmp_path / "a.h5", cfg)
    p = forward.last_pacer[0]
    assert p.decode_ms > 0 and p.done == 6 and p.costs
    extract(kaggle_dir, tmp_path / "b.h5", ExtractConfig(weights=WeightsSpec("random"), backbone="tiny",
                                                          device="cpu", workers=0, batch_size=2))
    a, b = read_index(tmp_path / "a.h5"), read_index(tmp_path / "b.h5")
    assert list(a.paths) == list(b.paths)
    np.testing.assert_array_equal(read_features(tmp_path / "a.h5"), read_features(tmp_path / "b.h5"))


def test_chunked_forward_gives_the_batch_forward(tmp_path, kaggle_dir):
    from catdog_cache.backbone import IMAGENET, build

    model = build(WeightsSpec("random"), "tiny")
    x = torch.rand(4, 1, 3, 224, 224)
    cfg = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny")
    whole, _ = forward._forward(x, [0, 1, 2, 3], ["a"] * 4, [], model, cfg, torch.device("cpu"), IMAGENET, None)
    parts, _ = forward._forward(x, [0, 1, 2, 3], ["a"] * 4, [], model, cfg, torch.device("cpu"), IMAGENET, None, 2)
    assert parts[1].shape == (4, 1, 4096)
    torch.testing.assert_close(parts[1], whole[1], rtol=1e-5, atol=1e-6)  # bitwise only for the same batches


def test_default_workers_fill_the_cores_on_a_cpu(monkeypatch):
    from catdog_cache.extract import loader

    monkeypatch.setattr(loader, "cores", lambda: 4)
    assert loader.default_workers(1000, cpu=True) == 4 and loader.default_workers(1000) == 3
    assert loader.default_workers(10, cpu=True) == 0


@pytest.mark.parametrize(("flags", "kind"), [("fpu avx512f avx512_bf16 sse", "avx512_bf16"),
                                             ("fpu amx_bf16 amx_tile avx512_bf16", "amx_bf16"),
                                             ("fpu avx2 fma", "")])
def test_cpu_bf16_from_the_flags(tmp_path, flags, kind):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert precision.cpu_bf16(str(info)) == kind
    assert precision.cpu_bf16(str(tmp_path / "none")) == ""


def test_precision_auto_is_resolved_and_recorded(tmp_path, kaggle_dir, cli, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "avx512_bf16")
    assert ExtractConfig(weights=WeightsSpec("random"), device="cpu", precision="auto").precision == "bf16"
    cli("extract", kaggle_dir, "--cache", tmp_path / "a.h5", "--backbone", "tiny", "--weights", "random",
        "--device", "cpu", "--precision", "auto", "-q")
    assert read_index(tmp_path / "a.h5").provenance.precision == "bf16"
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "")
    assert ExtractConfig(weights=WeightsSpec("random"), device="cpu", precision="auto").precision == "fp32"
    (kaggle_dir / "cat.9.jpg").write_bytes((kaggle_dir / "cat.0.jpg").read_bytes())
    cli("extract", kaggle_dir, "--cache", tmp_path / "a.h5", "--device", "cpu", "--precision", "auto", "-q")
    idx = read_index(tmp_path / "a.h5")  # auto adds to a cache at its recorded precision, not a refusal
    assert idx.provenance.precision == "bf16" and idx.shape[0] == 13


def test_bf16_capability_is_reported(cli, tmp_path, kaggle_dir, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "amx_bf16")
    assert "bf16 on this CPU: native (amx_bf16)" in cli("backbones").output
    cli("extract", kaggle_dir, "--cache", tmp_path / "a.h5", "--backbone", "tiny", "--weights", "random", "-q")
    assert "native (amx_bf16)" in cli("info", tmp_path / "a.h5").output
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "")
    assert "bf16 on this CPU: emulated" in cli("backbones").output
