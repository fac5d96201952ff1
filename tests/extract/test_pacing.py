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
from catdog_cache.extract.pacing import Gate, Pacer, Setting, rate


def split(cores: int, decode_ms: float, costs: dict[int, float], workers: int = 1) -> int:
    """The thread count the rate model prefers, given measured wall-ms per image at each (the Pacer's choice among
    one-stream shapes at one chunk size)."""
    return max(costs, key=lambda t: rate(cores, decode_ms, costs[t], t, workers))


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
    # (threads, images per call, streams) -> wall-ms per image: Lite0-like, two threads win only at 4 images
    table = {(2, 8, 1): 19.0, (1, 8, 1): 30.0, (1, 8, 2): 18.0, (1, 4, 2): 14.5, (2, 4, 1): 11.0, (1, 4, 1): 29.0}
    p = Pacer(cores=2, batch=16, workers=2, every=64)
    p.decode_ms = 3.5
    used = drive(p, lambda s, i: table[s.threads, s.chunk, s.streams], 80)
    # set-up batch (two one-thread streams); every shape once at the streams' share (8 images); the two close ones
    # again (one thread alone is far behind: not measured twice); halved chunks at the best shape (set-up +
    # measured); the close shape at the chunk chosen, which wins
    assert used[:9] == [Setting(1, 8, 2), Setting(2, 8), Setting(1, 8), Setting(1, 8, 2), Setting(2, 8),
                        Setting(1, 8, 2), Setting(1, 4, 2), Setting(1, 4, 2), Setting(2, 4)]
    assert p.best == Setting(2, 4) and used[9:73] == [Setting(2, 4)] * 64
    assert used[73:76] == [Setting(1, 4), Setting(1, 4, 2), Setting(2, 4)]  # 64 batches on: the other shapes
    # a neighbour arrives: two threads now stall; the chosen setting's own cost moves, which starts a new search at
    # once rather than after `every` batches
    p2 = Pacer(cores=2, batch=16, workers=2, every=1000)
    p2.decode_ms = 3.5
    used = drive(p2, lambda s, i: table[s.threads, s.chunk, s.streams] * (5 if i >= 20 and s.cores == 2 else 1), 40)
    assert p2.best == Setting(1, 4) and used[-1] == Setting(1, 4)
    forced = Pacer(cores=2, batch=16, workers=2, forced=1)
    assert {(s.threads, s.streams) for s in drive(forced, lambda s, i: table.get((s.threads, s.chunk, 1), 30), 40)} \
        == {(1, 1)}


def test_shapes_worth_measuring():
    assert pacing.shapes(2, 16) == [(2, 1), (1, 1), (1, 2)]
    assert pacing.shapes(4, 16) == [(4, 1), (2, 1), (2, 2), (1, 1), (1, 4)]
    assert pacing.shapes(16, 16) == [(16, 1), (8, 1), (8, 2), (4, 1), (4, 4), (2, 1), (1, 1)]  # 4+ images a stream
    assert pacing.shapes(1, 16) == [(1, 1)] and Setting(2, 4, 3).cores == 6


def test_streams_give_the_one_thread_forward_bit_for_bit():
    """Two concurrent calls over halves of an odd batch of two views each: the rows in order, each computed as
    one thread computes it alone."""
    from concurrent.futures import ThreadPoolExecutor

    from catdog_cache.backbone import IMAGENET, build

    model = build(WeightsSpec("random"), "tiny")
    x = torch.rand(5, 2, 3, 224, 224)
    cfg = ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", views=("center", "flip"))
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            alone, _ = forward._forward(x, list(range(5)), ["a"] * 5, [], model, cfg, cpu, IMAGENET, None,
                                        Setting(1, 2))
            with ThreadPoolExecutor(1) as pool:
                two, _ = forward._forward(x, list(range(5)), ["a"] * 5, [], model, cfg, cpu, IMAGENET, None,
                                          Setting(1, 2, 2), pool)
    finally:
        torch.set_num_threads(threads)
    assert two[1].shape == (5, 2, 4096) and two[0] == list(range(5))
    assert torch.equal(two[1], alone[1])
    assert not torch.equal(two[1][:3], alone[1][2:])  # the rows differ, so their order is what is compared


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
    parts, _ = forward._forward(x, [0, 1, 2, 3], ["a"] * 4, [], model, cfg, torch.device("cpu"), IMAGENET, None,
                                Setting(1, 2))
    assert parts[1].shape == (4, 1, 4096)
    torch.testing.assert_close(parts[1], whole[1], rtol=1e-5, atol=1e-6)  # bitwise only for the same batches


def test_default_workers_fill_the_cores_on_a_cpu(monkeypatch):
    from catdog_cache.extract import loader

    monkeypatch.setattr(loader, "cores", lambda: 4)
    assert loader.default_workers(1000, cpu=True) == 4 and loader.default_workers(1000) == 3
    assert loader.default_workers(10, cpu=True) == 0


def test_tar_input_gets_the_same_workers_as_a_folder(monkeypatch):
    """Tars on a CPU: one worker per core behind the gate too (they had cores - 1, a GPU's share)."""
    from catdog_cache.extract import loader, tar_units
    from catdog_cache.sources.spec import Identity

    monkeypatch.setattr(loader, "cores", lambda: 4)
    shards = [Identity(8 << 20, "a"), Identity(8 << 20, "b")]
    assert tar_units.default_tar_workers(shards, "cpu") == 4
    assert tar_units.default_tar_workers([Identity(100_000, "a")], "cpu") == 0  # ~6 images: in process


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
