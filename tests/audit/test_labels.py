"""Label issues on real ImageNet features (EfficientNet-Lite0) of drawn cats and dogs with two labels flipped on
purpose: the flipped ones come first; and side by side with cleanlab on the same out-of-fold probabilities."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog_cache.audit.labels import OutOfFold, label_issues, out_of_fold
from catdog_cache.backbone import WeightsSpec
from catdog_cache.demo import draw_animal
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.fit import FitConfig

LITE = ExtractConfig(weights=WeightsSpec("imagenet"), backbone="efficientnet_lite0", workers=0, device="cpu")
FLIPPED = ["dog/cat.0.jpg", "cat/dog.1.jpg"]


@pytest.fixture(scope="module")
def flipped(tmp_path_factory) -> Path:
    """10 cats and 10 dogs in class folders, cat.0 filed under dog/ and dog.1 under cat/, a picture of noise under
    cat/; their Lite0 cache."""
    root = tmp_path_factory.mktemp("flipped")
    for kind in ("cat", "dog"):
        for i in range(10):
            path = root / "train" / kind / f"{kind}.{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_animal(kind, random.Random(2 * i + (kind == "dog")), size=96).save(path, quality=90)
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)  # neither a cat nor a dog
    Image.fromarray(noise).save(root / "train" / "cat" / "noise.jpg", quality=90)
    for wrong in FLIPPED:
        right = ("cat" if wrong.startswith("dog/") else "dog") + "/" + wrong.split("/")[1]
        shutil.move(root / "train" / right, root / "train" / wrong)
    extract(root / "train", root / "lite.h5", LITE)
    return root


def test_flipped_labels_rank_first_and_noise_is_the_outlier(cli, flipped):
    import json

    d = json.loads(cli("audit", "--cache", flipped / "lite.h5", "--json", "--no-sheets", "--out",
                       flipped / "a.csv").output)
    first = [str(Path(li["path"]).relative_to(flipped / "train")) for li in d["label_issues"][:2]]
    assert sorted(first) == sorted(FLIPPED)
    for li in d["label_issues"][:2]:
        assert li["suggested"] != li["given"] and li["p_given"] < 0.5 and li["suggested"] == Path(li["path"]).name[:3]
    p = [li["p_given"] for li in d["label_issues"]]
    assert p == sorted(p)
    assert Path(d["outliers"][0]["path"]).name == "noise.jpg"  # the farthest from every other row


def test_same_issues_as_cleanlab_on_the_same_out_of_fold_probabilities(flipped):
    """cleanlab's find_label_issues (confident learning) on the audit's own out-of-fold probabilities: the rows the
    audit marks `confident` are exactly cleanlab's confident-joint off-diagonal, and both rank by self-confidence."""
    cleanlab_filter = pytest.importorskip("cleanlab.filter", reason="cleanlab is not installed (pip install "
                                          "cleanlab, in the dev extra): the comparison needs it")
    oof = out_of_fold(flipped / "lite.h5", FitConfig(), 5, 2**30, None)
    ours = label_issues(oof)
    at = {int(r): i for i, r in enumerate(oof.rows)}
    confident = sorted(at[li.row] for li in ours if li.confident)
    theirs = np.flatnonzero(cleanlab_filter.find_label_issues(oof.given, oof.probs, filter_by="confident_learning"))
    assert confident == theirs.tolist()
    ranked = cleanlab_filter.find_label_issues(oof.given, oof.probs, return_indices_ranked_by="self_confidence")
    mine = [at[li.row] for li in ours if at[li.row] in set(ranked.tolist())]
    assert mine == [i for i in ranked.tolist() if i in set(mine)]  # the same order where both flag a row
    assert len(ranked) >= 2 and {at[li.row] for li in ours[:2]} <= set(ranked.tolist())


def test_confident_learning_matches_cleanlab_for_k_classes():
    """The same count on made-up probabilities of 4 classes, ambiguous rows included."""
    cleanlab_filter = pytest.importorskip("cleanlab.filter", reason="cleanlab is not installed (pip install "
                                          "cleanlab, in the dev extra): the comparison needs it")
    rng = np.random.default_rng(3)
    given = np.repeat(np.arange(4), 30)
    logits = rng.normal(size=(120, 4)) + 3 * np.eye(4)[given]
    logits[:8] = rng.normal(size=(8, 4)) + 3 * np.eye(4)[(given[:8] + 1) % 4]  # 8 wrong labels
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    oof = OutOfFold(np.arange(120), probs, given, list("abcd"), 5)
    confident = sorted(li.row for li in label_issues(oof) if li.confident)
    theirs = np.flatnonzero(cleanlab_filter.find_label_issues(given, probs, filter_by="confident_learning"))
    assert confident == theirs.tolist()
    assert set(range(8)) <= {li.row for li in label_issues(oof)}
