"""A linear head's batches prepared a step ahead on a second core (fit/ahead.py): the same heads bit for bit, the
buffers handed out in turn so that a batch in use is never overwritten, errors raised in the training loop."""

from __future__ import annotations

import threading

import pytest
import torch

from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit import ahead as fit_ahead
from catdog_cache.fit import loop as fit_loop
from catdog_cache.fit.head import load_head
from tests.fit.test_fit import synthetic_cache


@pytest.mark.parametrize("cfg", [FitConfig(epochs=3), FitConfig(epochs=2, dropout=0.3, weight_decay=0.01),
                                 FitConfig(epochs=2, dropout=0.0, batch_size=37)], ids=["default", "p0.3", "p0"])
def test_heads_are_the_serial_loops_bit_for_bit(tmp_path, monkeypatch, cfg):
    cache = tmp_path / "c.h5"
    synthetic_cache(cache, n=700)
    seen = []
    real = fit_loop.ahead

    def counted(items, work, depth=1):
        seen.append(True)
        return real(items, work, depth)

    monkeypatch.setattr(fit_loop, "ahead", counted)
    monkeypatch.setattr(fit_loop, "spare_core", lambda: True)  # ahead even where one core is all there is
    fit(cache, tmp_path / "a.pt", cfg)
    assert seen  # the pass ran ahead
    monkeypatch.setenv("CATDOG_FIT_AHEAD", "0")
    seen.clear()
    fit(cache, tmp_path / "b.pt", cfg)
    assert not seen
    a, b = load_head(tmp_path / "a.pt")[0].state_dict(), load_head(tmp_path / "b.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_buffers_come_back_only_after_ring_calls():
    rings: dict = {}
    turns: dict = {}
    got = [fit_ahead.take(rings, turns, 128, 3, object) for _ in range(7)]
    assert len({id(g) for g in got[:3]}) == 3 and got[3:6] == got[:3] and got[6] is got[0]
    # a ring grown after use still hands out each buffer once per `ring` calls
    rings, turns = {}, {}
    first = [fit_ahead.take(rings, turns, 1, 1, object) for _ in range(2)]
    grown = [fit_ahead.take(rings, turns, 1, 3, object) for _ in range(6)]
    assert first[0] is first[1] and len({id(g) for g in grown[:3]}) == 3 and grown[3:] == grown[:3]


def test_an_error_while_preparing_is_raised_in_the_loop_and_the_thread_ends():
    def work(i):
        if i == 3:
            raise ValueError("bad batch")
        return i

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for v in fit_ahead.ahead(range(10), work):
            got.append(v)
    assert got == [0, 1, 2]
    before = threading.active_count()
    gen = fit_ahead.ahead(range(1000), lambda i: i)
    assert next(gen) == 0
    gen.close()  # the consumer stops early: the thread is stopped and joined
    assert threading.active_count() <= before
