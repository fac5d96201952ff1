"""What audit writes: the findings as CSV rows, as one JSON object, and as one contact sheet per kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import json_text, printable
from .duplicates import Pair
from .labels import LabelIssue, OutOfFold
from .outliers import Outlier
from .rows import CacheRows
from .sheets import label_of, name_of, sheet

KINDS = ("label_issues", "near_duplicates", "exact_duplicates", "outliers")
CSV_HEADER = ["kind", "path", "other_path", "score", "given", "suggested"]


@dataclass
class Findings:
    rows: CacheRows
    label_issues: list[LabelIssue] = field(default_factory=list)
    near: list[Pair] = field(default_factory=list)  # within the cache, then each --against cache's
    exact: list[Pair] = field(default_factory=list)
    outliers: list[Outlier] = field(default_factory=list)
    oof: OutOfFold | None = None  # None: the cache has fewer than two labeled classes

    def counts(self) -> dict[str, int]:
        return {"label_issues": len(self.label_issues), "near_duplicates": len(self.near),
                "exact_duplicates": len(self.exact), "outliers": len(self.outliers)}


def csv_rows(f: Findings) -> list[tuple]:
    """One line per finding, each kind ranked as in the JSON: kind, path, other path, score, given, suggested."""
    r = f.rows
    out: list[tuple] = []
    for li in f.label_issues:
        out.append(("label_issue", r.names[li.row], "", round(li.p_given, 6), r.classes[li.given],
                    r.classes[li.suggested]))
    for kind, pairs in (("near_duplicate", f.near), ("exact_duplicate", f.exact)):
        for p in pairs:
            out.append((kind, r.names[p.a], p.other.names[p.b], round(p.score, 6), r.label_name(p.a),
                        p.other.label_name(p.b)))
    for o in f.outliers:
        out.append(("outlier", r.names[o.row], "", round(o.score, 6), r.label_name(o.row), ""))
    return out


def pair_json(p: Pair, rows: CacheRows, score: str) -> dict[str, Any]:
    return {"a": json_text(rows.names[p.a]), "b": json_text(p.other.names[p.b]), score: round(p.score, 6),
            "a_label": rows.label_name(p.a), "b_label": p.other.label_name(p.b),
            "against": None if p.other is rows else str(p.other.cache)}


def as_json(f: Findings) -> dict[str, Any]:
    r = f.rows
    return {
        "label_issues": [{"path": json_text(r.names[li.row]), "given": r.classes[li.given],
                          "suggested": r.classes[li.suggested], "p_given": round(li.p_given, 6),
                          "p_suggested": round(li.p_suggested, 6),
                          "confident": li.confident} for li in f.label_issues],
        "near_duplicates": [pair_json(p, r, "cosine") for p in f.near],
        "exact_duplicates": [pair_json(p, r, "score") | {"sha256": r.sha256[p.a]} for p in f.exact],
        "outliers": [{"path": json_text(r.names[o.row]), "score": round(o.score, 6), "z": round(o.z, 3),
                      "given": r.label_name(o.row)} for o in f.outliers],
    }


def sheet_paths(out: Path) -> dict[str, Path]:
    """audit.csv -> audit.label_issues.png, audit.near_duplicates.png..."""
    return {k: out.with_name(f"{out.stem}.{k}.png") for k in KINDS}


def pair_caption(p: Pair, rows: CacheRows, what: str) -> list[str]:
    where = "" if p.other is rows else f" [{printable(p.other.cache.stem)[:12]}]"
    return [f"{what}\n{name_of(rows, p.a)}\n{label_of(rows, p.a)}",
            f"{what}{where}\n{name_of(p.other, p.b)}\n{label_of(p.other, p.b)}"]


def draw_sheets(f: Findings, paths: dict[str, Path]) -> dict[str, Path]:
    """A sheet per kind with findings. None is removed, not even an earlier run's sheet of a kind found empty now
    (audit deletes nothing): the report lists the sheets this run drew."""
    r = f.rows
    cache = printable(r.cache.name)
    items: dict[str, list] = {
        "label_issues": [([(r, li.row)], [f"given {printable(r.classes[li.given])[:14]}, p {li.p_given:.3f}\n"
                                          f"heads say {printable(r.classes[li.suggested])[:14]}\n{name_of(r, li.row)}"],
                          True) for li in f.label_issues],
        "near_duplicates": [([(r, p.a), (p.other, p.b)], pair_caption(p, r, f"cosine {p.score:.3f}"),
                             True if p.other is not r else None) for p in f.near],
        "exact_duplicates": [([(r, p.a), (p.other, p.b)], pair_caption(p, r, "same sha256"),
                              True if p.other is not r else None) for p in f.exact],
        "outliers": [([(r, o.row)], [f"kNN cosine {o.score:.3f}\nz {o.z:.1f}\n{name_of(r, o.row)}"], None)
                     for o in f.outliers],
    }
    titles = {"label_issues": "label issues: the lowest out-of-fold probability of the given label first",
              "near_duplicates": "near-duplicates: the most similar pairs first (red: across caches)",
              "exact_duplicates": "exact duplicates: identical file content (red: across caches)",
              "outliers": "outliers: the lowest mean cosine to the nearest rows first"}
    drawn = {}
    for kind, path in paths.items():
        made = sheet(items[kind], path, f"{cache}: {titles[kind]}")
        if made is not None:
            drawn[kind] = made
    return drawn
