"""An overfitting kept epoch is flagged: the rule, fit's warning, none for a head that does not overfit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit.loop import overfit
from tests.fit.test_fit import synthetic_cache


def test_overfit_rule() -> None:
    the_report = [0.30, 0.05, 0.017, 0.02, 0.025, 0.032]  # the MLP: best 0.017 at epoch 3, 0.032 kept
    assert overfit(the_report, 6) == {"best_epoch": 3, "best": 0.017, "kept_epoch": 6, "kept": 0.032}
    assert overfit(the_report, 3) is None  # --keep best
    assert overfit([0.012, 0.015], 2) is None  # 25% worse, but 0.003: noise at these losses
    assert overfit([0.30, 0.34], 2) is None  # 0.04 worse, but 13%: epoch-to-epoch wobble of a weak head
    assert overfit([float("nan")] * 3, 3) is None


def noisy_cache(path: Path, n: int = 300, dim: int = 512) -> None:
    """A clear signal and 10% flipped labels: an MLP without dropout learns the signal in a few epochs, then grows
    ever more confident on the flipped validation images, and its validation loss climbs."""
    from catdog_cache.cache import Rows, assemble, write_part
    from tests.fit.test_fit import PROV

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, n)
    x = np.abs(rng.normal(0, 0.1, (n, dim))).astype(np.float32)
    x[:, :16] += 1.0 * y[:, None]  # the features follow y...
    stored = np.where(rng.random(n) < 0.1, 1 - y, y)  # ...the labels only 70% of the time
    write_part(path, "p", PROV, "/synthetic", Rows(features=[r[None] for r in x], paths=[f"{i:05d}.jpg".encode()
               for i in range(n)], labels=stored.tolist(), sha256=[f"{i:064x}" for i in range(n)]), {}, (1, dim))
    assemble(path, PROV, {})


def test_fit_says_when_the_kept_epoch_overfits(cli, tmp_path: Path) -> None:
    noisy_cache(tmp_path / "c.h5")
    args = ["fit", "--cache", tmp_path / "c.h5", "--hidden", "128", "--dropout", "0", "--epochs", "30",
            "--lr", "0.01"]
    r = cli(*args)
    assert "warning: validation log loss was lowest at epoch" in r.output and "--keep best" in r.output
    report = json.loads(cli(*args, "--json").output)
    o = report["overfit"]
    assert o["kept_epoch"] == 30 and o["kept"] > 1.2 * o["best"] and report["kept_epoch"] == 30
    best = cli(*args, "--keep", "best")
    assert "warning" not in best.output  # the best epoch is kept: nothing to say
    folds = json.loads(cli(*args, "--folds", "3", "--json").output)
    assert folds["overfit"] and folds["overfit"]["kept_epoch"] == 30  # the folds' mean held-out curve


def test_no_warning_for_a_head_that_does_not_overfit(tmp_path: Path) -> None:
    synthetic_cache(tmp_path / "c.h5")
    r = fit(tmp_path / "c.h5", tmp_path / "h.pt", FitConfig(epochs=10))
    assert r.overfit == {} and r.overfit_note == ""
