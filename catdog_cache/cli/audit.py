"""`catdog-cache audit`: likely label errors, near-duplicates, train/test leakage and outliers, from a cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from ..files import printable, short
from .common import (
    CACHE,
    DEVICE,
    EPOCHS,
    JSON,
    QUIET,
    SEED,
    Bar,
    app,
    err,
    guarded,
    out,
    plural,
    to_json,
)

if TYPE_CHECKING:
    from ..audit.run import AuditReport


@app.command("audit")
@guarded
def audit_cmd(
    cache: Path = CACHE,
    against: list[Path] = typer.Option([], "--against", metavar="PATH", help="Another cache (e.g. the test set's) to "
                                       "search for copies of the audited rows: train/test leakage. Repeatable."),
    out_path: Path | None = typer.Option(None, "--out", show_default="beside the cache: cache/features.audit.csv",
                                         help="The findings CSV; the contact sheets go beside it "
                                         "(NAME.label_issues.png, NAME.near_duplicates.png...)."),
    near: float = typer.Option(0.90, "--near", help="Cosine similarity of the cached features at or above which two "
                               "rows are reported as near-duplicates."),
    folds: int = typer.Option(5, "--folds", help="Cross-fitted heads for the label scores (as fit --folds)."),
    epochs: int = EPOCHS,
    seed: int = SEED,
    outlier_k: int = typer.Option(5, "--outlier-k", help="Nearest rows averaged into a row's outlier score."),
    outlier_z: float = typer.Option(3.5, "--outlier-z", help="Report rows whose outlier score is this many robust "
                                    "standard deviations below the cache's median."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Memory budget, e.g. 2G: the neighbour search "
                                          "works in blocks sized to it, and the heads stream the cache beyond it "
                                          "(default: half the available memory). The findings are the same."),
    sheets: bool = typer.Option(True, "--sheets/--no-sheets", help="Draw a contact sheet per kind found."),
    device: str = DEVICE,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Find what to look at in a labeled data set: labels the out-of-fold heads doubt, exact and near-duplicates
    (within the cache and against --against caches), and outliers. Reads only: writes a CSV and contact sheets,
    never moves or deletes a file."""
    from .precheck import caches_readable

    caches_readable([cache, *against])
    from ..audit.run import AuditOptions, audit
    from ..fit import FitConfig

    opts = AuditOptions(near=near, folds=folds, fit=FitConfig(epochs=epochs, seed=seed), outlier_k=outlier_k,
                        outlier_z=outlier_z, max_memory=max_memory, device=device, sheets=sheets)
    with Bar(quiet or as_json) as bar:
        r = audit(cache, against, out_path, opts, bar)
    f = r.findings
    if as_json:
        from ..audit.report import as_json as findings_json

        print(to_json({**findings_json(f), "cache": str(cache), "against": [str(a) for a in against],
                       "csv": str(r.csv), "sheets": {k: str(p) for k, p in r.sheets.items()},
                       "near_threshold": opts.near, "folds": opts.folds if f.oof is not None else 0,
                       "rows": len(f.rows.names), "block_rows": r.block_rows, "in_memory": r.in_memory,
                       "seconds": r.seconds, "notes": r.notes}))
        return
    for note in r.notes:
        err.print(f"[yellow]note:[/] {escape(printable(note))}")
    if not quiet:
        out.print(summary_table(r))
    c = f.counts()
    out.print(f"[green]audited[/] {plural(len(f.rows.names), 'row')} of {escape(printable(str(cache)))} in "
              f"{r.seconds['total']:.1f}s: {plural(c['label_issues'], 'label issue')}, "
              f"{plural(c['near_duplicates'], 'near-duplicate pair')}, "
              f"{plural(c['exact_duplicates'], 'exact duplicate')}, "
              f"{plural(c['outliers'], 'outlier')} -> {escape(printable(str(r.csv)))}", highlight=False)


def summary_table(r: AuditReport) -> Table:
    """One line per kind: how many, the first one, and its contact sheet."""
    f, rows = r.findings, r.findings.rows
    t = Table("kind", "found", "first", "score", "sheet", title=f"audit of {printable(str(rows.cache))}")

    def name(text: str) -> str:
        return escape(short(printable(text), 70))

    first = {
        "label_issues": (name(rows.names[f.label_issues[0].row]) + f" ({rows.classes[f.label_issues[0].given]} -> "
                         f"{rows.classes[f.label_issues[0].suggested]})", f"p {f.label_issues[0].p_given:.3f}")
        if f.label_issues else ("", ""),
        "near_duplicates": (f"{name(f.near[0].other.names[f.near[0].b])} ~ {name(rows.names[f.near[0].a])}",
                            f"cos {f.near[0].score:.3f}") if f.near else ("", ""),
        "exact_duplicates": (f"{name(f.exact[0].other.names[f.exact[0].b])} = {name(rows.names[f.exact[0].a])}",
                             "1") if f.exact else ("", ""),
        "outliers": (name(rows.names[f.outliers[0].row]), f"kNN cos {f.outliers[0].score:.3f}")
        if f.outliers else ("", ""),
    }
    for kind, n in f.counts().items():
        sheet = r.sheets.get(kind)
        t.add_row(kind.replace("_", " "), f"{n:,}", *first[kind], escape(printable(str(sheet))) if sheet else "")
    return t
