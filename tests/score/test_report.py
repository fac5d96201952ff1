"""The per-class report (issue 31, item 7): confusion matrix, precision / recall / F1 / support, accuracy and macro
F1 as scikit-learn's classification_report (zero_division=nan), wherever a labeled set is scored."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from catdog_cache.score.report import class_report, from_confusion
from tests.conftest import TINY, draw, png_ok

NAN = float("nan")


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)
                                    for x, y in zip(a, b, strict=True))


def test_hand_worked_example():
    """Five classes; d is predicted once and never present, e neither: worked out on paper.
    confusion (rows true, columns predicted): a [2 1 0 0 0], b [0 1 1 0 0], c [0 0 0 1 0], d 0, e 0.
    precision TP / predicted: a 2/2, b 1/2, c 0/1, d 0/1, e 0/0 (NaN)
    recall TP / support:      a 2/3, b 1/2, c 0/1, d 0/0, e 0/0 (NaN, NaN)
    F1 2TP / (predicted + support): a 4/5, b 2/4, c 0/2, d 0/1, e 0/0 (NaN)
    accuracy 3/6; macro F1 over the defined ones: (0.8 + 0.5 + 0 + 0) / 4 = 0.325."""
    r = class_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 3], list("abcde"))
    assert r.confusion == [[2, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0] * 5, [0] * 5]
    assert same(r.precision, [1.0, 0.5, 0.0, 0.0, NAN])
    assert same(r.recall, [2 / 3, 0.5, 0.0, NAN, NAN])
    assert same(r.f1, [0.8, 0.5, 0.0, 0.0, NAN])
    assert r.support == [3, 2, 1, 0, 0] and r.n == 6
    assert r.accuracy == 0.5 and r.macro_f1 == pytest.approx(0.325)
    # unlabeled rows (-1) are left out; the report from the counts alone is the same
    assert repr(class_report([0, 0, 0, 1, 1, 2, -1], [0, 0, 1, 1, 2, 3, 4], list("abcde"))) == repr(r)  # NaN != NaN
    assert repr(from_confusion(r.confusion, list("abcde"))) == repr(r)
    j = r.to_json()
    assert set(j) == {"classes", "confusion", "per_class", "accuracy", "macro_f1"}
    assert j["per_class"][1] == {"class": "b", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    empty = class_report([], [], ["a", "b"])
    assert empty.n == 0 and math.isnan(empty.accuracy) and math.isnan(empty.macro_f1)


def test_agrees_with_scikit_learn():
    try:
        from sklearn.metrics import classification_report
    except ImportError as e:  # not a dependency (and a partial install does not import)
        pytest.skip(f"scikit-learn is not importable here ({e}); the hand-worked example covers the numbers")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 5, 200)
    p[p == 4] = 0
    y[y == 3] = 0  # class d: predicted, never present
    want = classification_report(y, p, labels=range(5), output_dict=True, zero_division=np.nan)
    r = class_report(y, p, list("abcde"))
    for i, c in enumerate(r.per_class()):
        w = want[str(i)]
        assert same([c["precision"], c["recall"], c["f1"]], [w["precision"], w["recall"], w["f1-score"]])
        assert c["support"] == w["support"]
    assert r.macro_f1 == pytest.approx(want["macro avg"]["f1-score"])


def three_classes(root: Path, n: int = 3) -> Path:
    for c, name in enumerate(("ant", "bee", "cow")):
        for i in range(n):
            draw(root / name / f"{i}.jpg", ("cat", "dog")[c % 2], 10 * c + i)
    return root


def csv_report(path: str, classes: list[str]):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return class_report([classes.index(r["true_label"]) for r in rows], [classes.index(r["label"]) for r in rows],
                        classes)


def test_predict_on_a_labeled_folder_reports_per_class(cli, tmp_path, test_dir):
    data = three_classes(tmp_path / "d")
    cli("extract", data, *TINY)
    cli("fit", "--epochs", "3", "--val-fraction", "0.4")
    p = json.loads(cli("predict", data, "--json").stdout)
    want = csv_report("cache/predictions.csv", ["ant", "bee", "cow"]).to_json()
    got = p["report"]
    assert got["classes"] == ["ant", "bee", "cow"] and got["confusion"] == want["confusion"]
    assert sum(map(sum, got["confusion"])) == 9 and [c["support"] for c in got["per_class"]] == [3, 3, 3]
    assert got["accuracy"] == pytest.approx(p["accuracy"]) and got["macro_f1"] == pytest.approx(
        np.nanmean([c["f1"] if c["f1"] is not None else np.nan for c in got["per_class"]]))
    # the confusion PNG beside --out, as fit draws one beside the head
    assert p["confusion_plot"] == str(Path("cache/predictions.confusion.png")) and png_ok(p["confusion_plot"])
    text = cli("predict", data).output
    assert "precision" in text and "recall" in text and "macro F1" in text and "confusion matrix:" in text
    assert "precision" not in cli("predict", data, "-q").output
    # an unlabeled folder: no report, and the earlier picture is not left to read as this run's
    p = json.loads(cli("predict", test_dir, "--json").stdout)
    assert p["report"] is None and p["confusion_plot"] is None
    assert not Path("cache/predictions.confusion.png").exists()


def test_fit_json_report_and_cat_dog_predict(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    f = json.loads(cli("fit", "--epochs", "3", "--val-fraction", "0.5", "--json").stdout)
    rep = f["report"]
    assert rep["confusion"] == f["confusion"] and rep["classes"] == ["cat", "dog"]
    assert [c["recall"] for c in rep["per_class"]] == [f["per_class_acc"]["cat"], f["per_class_acc"]["dog"]]
    assert sum(c["support"] for c in rep["per_class"]) == f["n_val"] and rep["accuracy"] == pytest.approx(f["val_acc"])
    p = json.loads(cli("predict", kaggle_dir, "--json").stdout)
    assert p["report"]["confusion"] == csv_report("cache/predictions.csv", ["cat", "dog"]).confusion
    assert p["confusion_plot"] is None  # cat/dog: the 2 x 2 table says it all, as in fit
