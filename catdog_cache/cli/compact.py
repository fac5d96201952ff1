"""`catdog-cache compact`: merge a sharded cache's shards into one."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..errors import CatdogError
from ..files import printable
from ..store.url import cache_arg
from .common import app, guarded, out, plural


@app.command("compact")
@guarded
def compact_cmd(path: Path | None = typer.Argument(None, metavar="CACHE", show_default=False, parser=cache_arg,
                                                  help="The cache (the same as --cache)."),
                cache: Path | None = typer.Option(None, "--cache", show_default="cache/features.h5", parser=cache_arg,
                                                  help="HDF5 feature cache."),
                single: bool = typer.Option(False, "--single", help="Leave one self-contained HDF5 file (schema 1) "
                                            "instead of an index and one shard: a file to move or copy alone.")
                ) -> None:
    """Merge a cache's shards into one (crash-safe: the old shards are deleted only after the new index lists the
    merged one). Readers see the same rows, in the same order, before and after."""
    from ..cache import compact, locked
    from ..extract.config import versions
    from ..store.staging import writable_cache
    from ..store.url import check_location

    if path is not None and cache is not None and path != cache:
        raise CatdogError(f"compact: the cache {path} and --cache {cache} differ; give one")
    given = check_location(path or cache or Path("cache/features.h5"))
    # a store URL: compacted in its staging copy under the writer's lease; the merged shard is uploaded, then the
    # index, then the superseded shards are removed (readers see the old index, whose shards exist, or the new one)
    with writable_cache(given, "compact") as local:
        local = local.resolve()  # a symlinked cache is compacted where it points
        with locked(local):
            before, after = compact(local, versions(), single=single)
    what = "one file" if single else plural(after, "shard")
    out.print(f"compacted {escape(printable(str(given)))}: {plural(before, 'shard')} -> {what}", highlight=False)
