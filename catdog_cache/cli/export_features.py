"""`catdog-cache export-features`: a cache's features, labels and paths as a NumPy .npz or a Parquet file (the
`export` command exports the model; this one the data, for scikit-learn and pandas)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..files import printable
from .common import CACHE, JSON, QUIET, Bar, app, guarded, out, to_json


@app.command("export-features")
@guarded
def export_features_cmd(
    cache: Path = CACHE,
    out_file: Path = typer.Option(..., "--out", help="FILE.npz (NumPy, np.load) or FILE.parquet (pandas; needs "
                                  "pyarrow)."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Write every row of a cache (features, labels, paths, source folders, in the cache's order) to .npz or
    .parquet, a block of rows at a time: for scikit-learn and pandas, without h5py."""
    from ..cache.export import export_features

    with Bar(quiet or as_json) as bar:
        done = export_features(cache, out_file, progress=bar)
    size = done.out.stat().st_size
    if as_json:
        print(to_json({"out": str(done.out), "rows": done.rows, "dim": done.dim, "views": done.views,
                       "arrays": done.arrays, "bytes": size}))
        return
    load = "np.load(path)" if done.out.suffix.lower() == ".npz" else "pandas.read_parquet(path)"
    out.print(f"exported {done.rows:,} rows of {done.dim}-d features with labels and paths -> "
              f"{escape(printable(str(done.out)))} ({size / 2**20:.1f} MiB; {', '.join(done.arrays)}): {load}",
              highlight=False)
