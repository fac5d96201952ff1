"""The per-class report (score.report.ClassReport) as a rich table: fit's validation and predict on a labeled folder
print the same one."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from ..files import printable

MAX_TABLE_CLASSES = 20  # a wider confusion matrix does not fit a terminal: --json has it whole


def _num(x: float) -> str:
    return f"{x:.3f}" if x == x else "-"  # NaN: no image predicted as the class, or none of it (sklearn's 0/0)


def report_table(report: Any, title: str) -> Table:
    """K x K counts (rows the true class, columns the predicted one), then each class's precision, recall (its
    accuracy), F1 and support; the accuracy and macro F1 below. Past MAX_TABLE_CLASSES, the metrics alone."""
    names = [escape(printable(c))[:12] for c in report.classes]
    metrics = ("precision", "recall", "F1", "support")
    caption = f"accuracy {_num(report.accuracy)}, macro F1 {_num(report.macro_f1)}"
    wide = len(names) > MAX_TABLE_CLASSES
    t = Table("class" if wide else "true \\ predicted", *([] if wide else names), *metrics,
              title=f"{title} (the confusion matrix is in --json)" if wide else title, caption=caption)
    for name, row, p in zip(names, report.confusion, report.per_class(), strict=True):
        t.add_row(name, *([] if wide else map(str, row)), _num(p["precision"]), _num(p["recall"]), _num(p["f1"]),
                  str(p["support"]))
    return t
