"""The audit's pieces on features it makes itself (no backbone): the blockwise search against brute force, the
memory plan, exact duplicates by content hash, outliers by their neighbours, label issues from probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from catdog_cache.audit.duplicates import exact_across, exact_within, near_within
from catdog_cache.audit.labels import OutOfFold, label_issues
from catdog_cache.audit.neighbours import Blocks, across, pair_bytes, plan, state_bytes, within
from catdog_cache.audit.outliers import knn_scores, outliers
from catdog_cache.audit.rows import CacheRows
from catdog_cache.errors import InputError

CPU = torch.device("cpu")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(q: np.ndarray, r: np.ndarray, k: int, same: bool) -> tuple[np.ndarray, np.ndarray]:
    s = unit(q) @ unit(r).T
    if same:
        np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("block_rows", [64, 128, 1024])
def test_blockwise_top_k_equals_brute_force(block_rows):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 48)).astype(np.float32)  # 300 rows: several blocks, a ragged last one
    nb = within(Blocks(x, block_rows, True, CPU), 7)
    sims, idx = brute(x, x, 7, same=True)
    np.testing.assert_allclose(nb.sims, sims, atol=1e-5)
    assert (nb.idx == idx).mean() > 0.99  # ties in float32 may order two equal sims either way
    assert not (nb.idx == np.arange(300)[:, None]).any()  # never its own neighbour

    q = rng.normal(size=(130, 48)).astype(np.float32)
    nb = across(Blocks(q, block_rows, True, CPU), Blocks(x, block_rows, True, CPU), 3)
    sims, idx = brute(q, x, 3, same=False)
    np.testing.assert_allclose(nb.sims, sims, atol=1e-5)
    assert (nb.idx == idx).all()


def test_fewer_rows_than_k_leave_empty_slots():
    x = np.eye(3, 8, dtype=np.float32)
    nb = within(Blocks(x, 64, True, CPU), 5)
    assert np.isfinite(nb.sims[:, :2]).all() and np.isneginf(nb.sims[:, 2:]).all()
    assert (nb.idx[:, 2:] == -1).all()


def test_plan_fits_the_budget_or_says_what_it_needs():
    n, dim, k = 100_000, 1280, 10
    budget = 512 * 2**20
    p = plan(n, 0, dim, k, budget, "near-duplicate")
    assert not p.in_memory  # 488 MiB of features cannot be held in half of 512M
    assert state_bytes(n, k) + 400 * n + pair_bytes(p.block_rows, dim) <= budget and p.block_rows % 64 == 0
    assert plan(n, 0, dim, k, 8 * 2**30, "near-duplicate").in_memory
    with pytest.raises(InputError, match=r"--max-memory: .* needs at least (\d+)M") as e:
        plan(n, 0, dim, k, 32 * 2**20, "near-duplicate")
    least = int(str(e.value).split("at least ")[1].split("M")[0]) * 2**20
    assert plan(n, 0, dim, k, least, "near-duplicate").block_rows == 64  # what the message asks for is enough
    assert plan(300, 0, dim, k, 8 * 2**30, "near-duplicate").block_rows == 320  # never far beyond the rows


def rows_of(shas: list[str], name: str = "c") -> CacheRows:
    return CacheRows(Path(f"{name}.h5"), [f"{name}/{i}.jpg" for i in range(len(shas))], [name] * len(shas),
                     [f"{i}.jpg" for i in range(len(shas))], shas, np.zeros(len(shas), np.int64), ["cat", "dog"])


def test_exact_duplicates_pair_each_copy_with_the_first():
    rows = rows_of(["a", "b", "a", "c", "a"])
    assert [(p.a, p.b) for p in exact_within(rows)] == [(0, 2), (0, 4)]  # three copies: two pairs, not three
    other = rows_of(["x", "c", "a"], "test")
    assert [(p.a, p.b) for p in exact_across(rows, other)] == [(3, 1), (0, 2)]


def test_near_pairs_are_unordered_once_and_skip_identical_content():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x[10] = x[3] + 0.01 * rng.normal(size=16)  # a near copy
    x[20] = x[3]  # same content: an exact duplicate, not listed again as near
    shas = [str(i) for i in range(50)]
    shas[20] = shas[3]
    nb = within(Blocks(x, 64, True, CPU), 5)
    pairs = near_within(rows_of(shas), nb, 0.99)
    assert {(p.a, p.b) for p in pairs} == {(3, 10), (10, 20)}
    assert all(p.score >= 0.99 for p in pairs)


def test_an_outlier_is_far_from_every_neighbour():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(2, 32))
    x = np.concatenate([c + 0.3 * rng.normal(size=(60, 32)) for c in centres]).astype(np.float32)
    x = np.concatenate([x, rng.normal(size=(1, 32)).astype(np.float32) * 3])  # row 120: neither cluster
    found = outliers(knn_scores(within(Blocks(x, 64, True, CPU), 10), 5))
    assert [o.row for o in found] == [120]
    assert found[0].z < -3.5


def test_label_issues_rank_by_the_given_labels_probability_for_k_classes():
    probs = np.array([[0.8, 0.1, 0.1], [0.05, 0.9, 0.05], [0.2, 0.3, 0.5], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8],
                      [0.40, 0.35, 0.25]])
    given = np.array([0, 1, 2, 2, 0, 1])  # rows 3 and 4 are wrong; row 5: another class is likelier, none confidently
    oof = OutOfFold(np.arange(6) + 100, probs, given, ["a", "b", "c"], 2)
    issues = label_issues(oof)
    assert [i.row for i in issues] == [103, 104, 105]  # the least likely given label first
    assert [(i.given, i.suggested) for i in issues] == [(2, 0), (0, 2), (1, 0)]
    assert [i.confident for i in issues] == [True, True, False]
