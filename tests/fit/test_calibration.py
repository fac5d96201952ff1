"""Temperature calibration: it lowers an overconfident head's log loss and says when it hit its bound."""

from __future__ import annotations

import numpy as np
import torch

from tests.conftest import TINY


def test_calibration_lowers_log_loss_of_overconfident_logits():
    from catdog_cache.fit import calibrate

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=g)
    signal = (2 * y - 1).float() + torch.randn(400, generator=g)  # noisy but informative
    logits = torch.stack([-signal, signal], 1) * 8  # far too confident
    c = calibrate(logits, y)
    assert c["temperature"] > 2 and c["log_loss_temperature"] < 0.7 * c["log_loss_before"]
    # the clip is never below its floor 1/(n+2); it costs each row at most -log(1 - floor) over the temperature's
    assert c["clip"] >= c["floor"] == 1 / 402
    assert c["log_loss_after"] <= c["log_loss_temperature"] - np.log1p(-c["floor"]) + 1e-12


def test_clamped_temperature_is_said(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    from catdog_cache.fit import calibrate

    logits = torch.tensor([[0.5, -0.5], [-0.5, 0.5]] * 10)  # separable: the temperature runs to its bound
    c = calibrate(logits, torch.tensor([0, 1] * 10))
    assert c["clamped"]
