"""A log loss one confident mistake cannot ruin (issue 31, item 9): the P(dog) clip is never below 1/(n+2) of its n
validation predictions, predict writes the clipped probabilities, and fit and predict list the worst-scored images."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from catdog_cache.cache import Rows, assemble, write_part
from catdog_cache.fit import FitConfig, calibrate, fit, log_loss, split
from catdog_cache.fit.calibration import clip_floor, clip_probs, row_losses, worst_rows
from catdog_cache.fit.head import load_head
from tests.conftest import TINY, rows
from tests.fit.test_fit import PROV


def confident(y: torch.Tensor, scale: float = 12.0) -> torch.Tensor:
    """Logits [n, 2] that are right about every row, and sure of it (P near 1 - 6e-6)."""
    s = (2 * y - 1).float() * scale
    return torch.stack([-s, s], 1)


def test_the_clip_is_never_zero():
    y = torch.tensor([0, 1] * 200)
    c = calibrate(confident(y), y)  # no mistake anywhere: clip 0 would score best here, and did
    assert c["floor"] == clip_floor(400) == 1 / 402 and c["clip"] >= c["floor"] > 0


def test_one_confident_mistake_costs_at_most_the_floor_s_loss():
    y = torch.tensor([0, 1] * 200)
    c = calibrate(confident(y), y)
    held_y = np.array([0, 1] * 50)
    held = clip_probs((confident(torch.from_numpy(held_y)) / c["temperature"]).softmax(1).numpy(), c["clip"])
    held_y[0] = 1  # a cat file labeled dog, predicted cat with P near 1
    losses = row_losses(held, held_y)
    assert losses[0] == losses.max() <= -math.log(c["clip"]) + 1e-9 <= math.log(402) + 1e-9  # 6.0 nats, not 12+
    assert held.min() >= c["clip"] and held.max() <= 1 - c["clip"]


def test_row_losses_are_log_loss_row_by_row():
    rng = np.random.default_rng(0)
    p2 = rng.dirichlet([1, 1], 50)
    y2 = rng.integers(0, 2, 50)
    p4 = rng.dirichlet([1, 1, 1, 1], 50)
    y4 = rng.integers(0, 4, 50)
    assert np.isclose(row_losses(p2, y2).mean(), log_loss(p2, y2))
    assert np.isclose(row_losses(p4, y4).mean(), log_loss(p4, y4))
    worst = worst_rows([f"{i}.jpg" for i in range(50)], p4, y4, ["a", "b", "c", "d"], k=3)
    order = np.argsort(-row_losses(p4, y4))[:3]
    assert [w["path"] for w in worst] == [f"{i}.jpg" for i in order]
    assert worst[0]["label"] == "abcd"[y4[order[0]]] and np.isclose(worst[0]["p_label"], p4[order[0], y4[order[0]]])


def mislabeled_cache(path, n: int = 400) -> tuple[int, np.ndarray]:
    """synthetic_cache's features, with one validation image's label flipped (its features say the other class).
    Returns that image and the labels as stored."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = np.abs(rng.normal(0, 1, (n, 4096))).astype(np.float32)
    x[:, :64] += 3 * y[:, None]
    paths = [f"{i:05d}.jpg".encode() for i in range(n)]
    for bad in range(n):  # the first image that lands in the validation split once its label is flipped
        stored = y.copy()
        stored[bad] = 1 - y[bad]
        if bad in split(paths, stored, 0.2, 0)[1]:
            break
    write_part(path, "p", PROV, "/synthetic", Rows(features=[r[None] for r in x], paths=paths,
                                                     labels=stored.tolist(), sha256=[f"{i:064x}" for i in range(n)]),
               {}, (1, 4096))
    assemble(path, PROV, {})
    return bad, stored


def test_fit_lists_the_worst_validation_images(cli, tmp_path):
    bad, labels = mislabeled_cache(tmp_path / "c.h5")
    r = fit(tmp_path / "c.h5", tmp_path / "h.pt", FitConfig(epochs=20), curve=False)
    assert r.worst[0]["path"] == f"{bad:05d}.jpg" and r.worst[0]["p_label"] < 0.05 and len(r.worst) == 5
    assert r.worst[0]["label"] == ["cat", "dog"][labels[bad]] != r.worst[0]["predicted"]
    assert [w["log_loss"] for w in r.worst] == sorted((w["log_loss"] for w in r.worst), reverse=True)
    out = cli("fit", "--cache", tmp_path / "c.h5", "--head", tmp_path / "h.pt", "--epochs", "20").output
    assert "worst-scored validation images" in out and f"{bad:05d}.jpg: labeled" in out
    folds = json.loads(cli("fit", "--cache", tmp_path / "c.h5", "--head", tmp_path / "h.pt", "--epochs", "5",
                           "--folds", "3", "--calibrate", "--json").output)
    assert folds["worst"][0]["path"] == f"{bad:05d}.jpg"  # out-of-fold: every labeled image is scored once
    _, meta = load_head(tmp_path / "h.pt")
    assert meta["clip"] >= 1 / (400 + 2)


def test_predict_writes_clipped_probabilities_and_the_worst_images(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "3", "--calibrate", "--folds", "3")
    _, meta = load_head("cache/features.head.pt")
    assert meta["clip"] >= 1 / (12 + 2)
    r = cli("predict", kaggle_dir, "--out", "p.csv")
    assert "worst-scored images" in r.output
    written = rows("p.csv")  # path, p_cat, p_dog, label, true_label, log_loss
    p_dog = [float(w[2]) for w in written]
    assert meta["clip"] - 1e-12 <= min(p_dog) and max(p_dog) <= 1 - meta["clip"] + 1e-12
    data = json.loads(cli("predict", kaggle_dir, "--out", "p.csv", "--json").output)
    top = sorted(written, key=lambda w: -float(w[5]))[:len(data["worst"])]
    assert [w["path"] for w in data["worst"]] == [w[0] for w in top]
    assert math.isclose(np.mean([float(w[5]) for w in written]), data["log_loss"], rel_tol=1e-9)
