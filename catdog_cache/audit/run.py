"""audit itself: a cache (and the caches to check it against) in, findings out as a CSV, contact sheets and a
report. It reads the caches and the pictures it draws, and writes only its outputs."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import open_cache, require_same
from ..errors import InputError
from ..extract.config import Progress
from ..files import check_outputs, file_key
from ..fit import FitConfig, available_memory, parse_size, training_device
from ..score.outputs import write_csv_atomic
from .duplicates import NEAR, exact_across, exact_within, near_across, near_within
from .labels import label_issues, out_of_fold
from .neighbours import Blocks, across, plan, within
from .outliers import K, Z, knn_scores, outliers
from .report import CSV_HEADER, Findings, csv_rows, draw_sheets, sheet_paths
from .rows import CacheRows, cache_rows

TOP_K = 10  # neighbours kept per row: the near-duplicate candidates of a row, and the outlier score's neighbours


@dataclass
class AuditOptions:
    near: float = NEAR  # cosine at or above which a pair is a near-duplicate
    folds: int = 5  # cross-fitted heads for the label scores
    fit: FitConfig = field(default_factory=FitConfig)  # how each fold's head is trained (fit's defaults)
    outlier_k: int = K
    outlier_z: float = Z
    max_memory: str | None = None  # None: half the available memory, as fit
    device: str = "auto"
    sheets: bool = True

    def check(self) -> None:
        if not -1.0 <= self.near <= 1.0:
            raise InputError(f"--near is a cosine similarity, between -1 and 1; got {self.near}")
        if not 1 <= self.outlier_k <= TOP_K:
            raise InputError(f"--outlier-k must be between 1 and {TOP_K}, got {self.outlier_k}")
        if not self.outlier_z > 0:
            raise InputError(f"--outlier-z must be positive, got {self.outlier_z}")


@dataclass
class AuditReport:
    findings: Findings
    others: list[CacheRows]
    csv: Path
    sheets: dict[str, Path]
    options: AuditOptions
    block_rows: int = 0
    in_memory: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_out(cache: Path) -> Path:
    """cache/features.h5 -> cache/features.audit.csv (beside the cache, as fit's head)."""
    return cache.with_name(f"{cache.stem}.audit.csv")


def audit(cache: str | os.PathLike[str], against: list | tuple = (), out: str | os.PathLike[str] | None = None,
          options: AuditOptions | None = None, progress: Progress | None = None) -> AuditReport:
    """Find the rows of `cache` worth a look: labels its cross-fitted heads doubt, near and exact duplicates (within
    it, and with each cache of `against`), and outliers. Writes the CSV (and a contact sheet per kind found)."""
    o = options or AuditOptions()
    o.check()
    cache, others = Path(cache), [Path(a) for a in against]
    keys = [file_key(c) for c in [cache, *others]]
    if len(set(keys)) != len(keys):
        raise InputError("--cache / --against: the same cache given twice")
    out = Path(out) if out is not None else default_out(cache)
    sheets = sheet_paths(out) if o.sheets else {}
    check_outputs({"--out": out, **{f"the {k} sheet": p for k, p in sheets.items()}},
                  {"--cache": cache, **{f"--against {a}": a for a in others}})
    budget = parse_size(o.max_memory) if o.max_memory else available_memory() // 2
    device = training_device(o.device)
    on = device or torch.device("cpu")
    seconds: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        view, index = stack.enter_context(open_cache(cache))
        rows = cache_rows(cache, index)
        if not len(rows.names):
            raise InputError(f"{cache} is empty (0 rows): nothing to audit")
        n, dim = index.shape[0], index.shape[2]
        p = plan(n, 0, dim, TOP_K, budget, "near-duplicate")
        mine = Blocks(view, p.block_rows, p.in_memory, on)
        nb = within(mine, TOP_K, (lambda d, t: progress("neighbours", d, t)) if progress else None)
        block_rows, in_memory = p.block_rows, p.in_memory
        del mine
        findings = Findings(rows, exact=exact_within(rows), near=near_within(rows, nb, o.near))
        findings.outliers = outliers(knn_scores(nb, o.outlier_k), o.outlier_z)
        seconds["neighbours"] = time.perf_counter() - t0
        other_rows = []
        for a in others:
            t1 = time.perf_counter()
            oview, oindex = stack.enter_context(open_cache(a))
            require_same(oindex.provenance, index.provenance, f"--against {a}", f"--cache {cache}")
            orows = cache_rows(a, oindex)
            other_rows.append(orows)
            if not len(orows.names):
                notes.append(f"--against {a} is empty: nothing to compare")
                continue
            p = plan(len(orows.names), n, dim, TOP_K, budget, "train/test")
            block_rows, in_memory = min(block_rows, p.block_rows), in_memory and p.in_memory
            nb_a = across(Blocks(oview, p.block_rows, p.in_memory, on), Blocks(view, p.block_rows, p.in_memory, on),
                          TOP_K, (lambda d, t: progress("against", d, t)) if progress else None)
            findings.exact += exact_across(rows, orows)
            findings.near += near_across(rows, orows, nb_a, o.near)
            seconds[f"against {a}"] = time.perf_counter() - t1
    findings.near.sort(key=lambda q: -q.score)  # stable: within before across at equal cosine
    labeled = set(rows.labels[rows.labels >= 0].tolist())
    if len(labeled) >= 2:
        t1 = time.perf_counter()
        findings.oof = out_of_fold(cache, o.fit, o.folds, budget, device)
        findings.label_issues = label_issues(findings.oof)
        seconds["label scores"] = time.perf_counter() - t1
    else:
        notes.append(f"{cache} holds {'one labeled class' if labeled else 'no labels'}: no label scores (they "
                     "need two classes)")
    write_csv_atomic(out, CSV_HEADER, csv_rows(findings))
    drawn = draw_sheets(findings, sheets) if sheets else {}
    seconds["total"] = time.perf_counter() - t0
    return AuditReport(findings, other_rows, out, drawn, o, block_rows, in_memory, seconds, notes)
