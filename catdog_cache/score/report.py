"""The per-class report of a labeled set scored by a head: the confusion matrix and each class's precision, recall,
F1 and support, with the accuracy and the macro F1, as scikit-learn's classification_report computes them with
zero_division=nan: a ratio whose denominator is 0 (a class never predicted, a class with no image) is NaN, not 0,
and the macro F1 averages the classes whose F1 is defined. fit's validation (or out-of-fold predictions) and predict
on a labeled folder both report it. numpy only: scikit-learn is not a dependency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassReport:
    classes: list[str]
    confusion: list[list[int]]  # [K, K]: rows the true class, columns the predicted one
    precision: list[float]  # of the images predicted as the class, the share that are; NaN if none was predicted
    recall: list[float]  # of the class's images, the share predicted as it (the class's accuracy); NaN if none
    f1: list[float]  # 2 TP / (2 TP + FP + FN), the harmonic mean of the two; NaN if neither predicted nor present
    support: list[int]  # the class's images
    accuracy: float  # NaN for no image
    macro_f1: float  # the mean F1 of the classes where it is defined

    @property
    def n(self) -> int:
        return sum(self.support)

    def per_class(self) -> list[dict[str, Any]]:
        return [{"class": c, "precision": p, "recall": r, "f1": f, "support": s} for c, p, r, f, s in zip(
            self.classes, self.precision, self.recall, self.f1, self.support, strict=True)]

    def to_json(self) -> dict[str, Any]:
        """--json's "report" (NaN becomes null through the CLI's to_json)."""
        return {"classes": list(self.classes), "confusion": self.confusion, "per_class": self.per_class(),
                "accuracy": self.accuracy, "macro_f1": self.macro_f1}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def from_confusion(confusion: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str]) -> ClassReport:
    """Everything in the report follows from the K x K counts (rows true, columns predicted)."""
    c = np.asarray(confusion, dtype=np.int64).reshape(len(classes), len(classes))  # [K, K]
    tp = np.diag(c).astype(np.float64)  # [K]
    predicted = c.sum(0).astype(np.float64)  # [K] TP + FP
    support = c.sum(1)  # [K] TP + FN
    f1 = _ratio(2 * tp, predicted + support)  # 2TP / (2TP + FP + FN): no NaN when only one of P, R is undefined
    n = int(support.sum())
    defined = f1[~np.isnan(f1)]
    return ClassReport(list(classes), c.tolist(), _ratio(tp, predicted).tolist(), _ratio(tp, support.astype(
        np.float64)).tolist(), f1.tolist(), support.tolist(), float(tp.sum() / n) if n else float("nan"),
        float(defined.mean()) if len(defined) else float("nan"))


def class_report(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, classes: Sequence[str]
                 ) -> ClassReport:
    """Class ids in [0, K) (true, predicted) -> the report; a pair with a true id < 0 (unlabeled) is left out."""
    t = np.asarray(y_true, dtype=np.int64)  # [N]
    p = np.asarray(y_pred, dtype=np.int64)  # [N]
    keep = t >= 0
    k = len(classes)
    c = np.zeros((k, k), np.int64)  # [K, K]
    np.add.at(c, (t[keep], p[keep]), 1)
    return from_confusion(c, classes)
