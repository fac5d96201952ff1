"""The default epochs train to convergence (issue 31, item 8): on until the validation (or out-of-fold) log loss stops
falling, whatever the set's size; --epochs N is exactly N; a curve still falling at the end is said."""

from __future__ import annotations

import numpy as np
import torch

from catdog_cache.cache import Rows, assemble, write_part
from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit.config import (
    AUTO_MIN_EPOCHS,
    AUTO_NO_VAL_STEPS,
    converged,
    max_epochs,
    steps_per_epoch,
    still_falling,
)
from catdog_cache.fit.head import load_head
from tests.fit.test_fit import PROV


def small_cache(path, n: int = 160, dim: int = 64, seed: int = 1) -> None:
    """A small set a linear head learns slowly: 8 of 64 non-negative dims shifted by one noise sd for class 1. At
    batch 128 its 128 training rows are one Adam step an epoch: 20 epochs are 20 steps, far from converged."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.abs(rng.normal(0, 1, (n, dim))).astype(np.float32)
    x[:, :8] += y[:, None]
    rows = Rows(features=[r[None] for r in x], paths=[f"{i:05d}.jpg".encode() for i in range(n)], labels=y.tolist(),
                sha256=[f"{i:064x}" for i in range(n)])
    write_part(path, "p", PROV, "/synthetic", rows, {}, (1, dim))
    assemble(path, PROV, {})


def test_default_trains_until_the_validation_loss_stops_falling(tmp_path):
    small_cache(tmp_path / "c.h5")
    twenty = fit(tmp_path / "c.h5", tmp_path / "a.pt", FitConfig(epochs=20), curve=False)
    r = fit(tmp_path / "c.h5", tmp_path / "b.pt", FitConfig(), curve=False)
    # the old default stopped at 20 one-step epochs: validation log loss ~0.61, accuracy ~0.6
    assert len(r.history) > 5 * AUTO_MIN_EPOCHS, len(r.history)
    assert r.val_log_loss < 0.7 * twenty.val_log_loss and r.val_acc > twenty.val_acc + 0.2, (r.val_log_loss,
                                                                                            twenty.val_log_loss)
    steps = steps_per_epoch(r.n_train, 128)
    assert converged([h.val_loss for h in r.history], steps)  # it stopped because the curve flattened, not at the cap
    assert len(r.history) < max_epochs(FitConfig(), r.n_train, True) and not r.falling and not r.falling_note
    assert load_head(tmp_path / "b.pt")[1]["kept_epoch"] == len(r.history)


def test_epochs_given_are_exactly_those(tmp_path):
    small_cache(tmp_path / "c.h5")
    r = fit(tmp_path / "c.h5", tmp_path / "a.pt", FitConfig(epochs=7), curve=False)
    assert len(r.history) == 7 and r.kept_epoch == 7
    r = fit(tmp_path / "c.h5", tmp_path / "b.pt", FitConfig(epochs=7), curve=False, folds=3)
    assert len(r.history) == 7 and r.folds["final_epochs"] == 7


def test_default_without_validation_takes_its_steps(tmp_path):
    small_cache(tmp_path / "c.h5")
    r = fit(tmp_path / "c.h5", tmp_path / "a.pt", FitConfig(val_fraction=0.0), curve=False)
    assert len(r.history) == AUTO_NO_VAL_STEPS // 2  # 160 rows at batch 128: two steps an epoch
    assert r.falling["what"] == "training" and "--val-fraction or --folds" in r.falling_note


def test_default_is_deterministic(tmp_path):
    small_cache(tmp_path / "c.h5")
    a = fit(tmp_path / "c.h5", tmp_path / "a.pt", FitConfig(seed=3), curve=False)
    b = fit(tmp_path / "c.h5", tmp_path / "b.pt", FitConfig(seed=3), curve=False)
    assert len(a.history) == len(b.history)
    ha, hb = load_head(tmp_path / "a.pt")[0], load_head(tmp_path / "b.pt")[0]
    assert torch.equal(ha.linear.weight, hb.linear.weight) and torch.equal(ha.linear.bias, hb.linear.bias)


def test_folds_stop_together_and_the_final_head_trains_as_long(tmp_path):
    small_cache(tmp_path / "c.h5")
    r = fit(tmp_path / "c.h5", tmp_path / "a.pt", FitConfig(), curve=False, folds=3)
    assert r.folds["final_epochs"] == len(r.history) > 5 * AUTO_MIN_EPOCHS
    assert max(r.folds["best_epochs"]) <= len(r.history)


def test_a_curve_still_falling_is_said(cli, tmp_path):
    small_cache(tmp_path / "c.h5")
    r = fit(tmp_path / "c.h5", tmp_path / "a.pt", FitConfig(epochs=20), curve=False)
    assert r.falling["what"] == "validation" and r.falling["drop"] > 0.01 and "--epochs 40" in r.falling_note
    out = cli("fit", "--cache", tmp_path / "c.h5", "--head", tmp_path / "b.pt", "--epochs", "20").output
    assert "still falling" in out and "--epochs 40" in out
    assert "still falling" not in cli("fit", "--cache", tmp_path / "c.h5", "--head", tmp_path / "b.pt").output


def test_still_falling_and_converged():
    assert still_falling([1.0] * 30) is None and still_falling([]) is None
    drop, window = still_falling(list(np.linspace(1.0, 0.5, 30)))
    assert window == 6 and 0.15 < drop < 0.2  # 0.5 against 0.603, the lowest of the first 24
    assert still_falling([1.0, 0.99, 0.995] * 10) is None  # noise around a level is no fall
    assert not converged([1.0] * (AUTO_MIN_EPOCHS - 1), 10)  # never before the minimum
    assert converged([1.0] * AUTO_MIN_EPOCHS, 10)
    assert not converged([1.0] * AUTO_MIN_EPOCHS, 1)  # one step an epoch: 100 epochs must be looked back on
    assert converged([1.0] * 101, 1) and not converged(list(np.linspace(1.0, 0.5, 101)), 1)
