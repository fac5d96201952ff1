"""`catdog-cache info`: what a cache holds, its provenance and failures."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import CatdogError
from ..files import printable, regular_prefix
from .common import (
    JSON,
    app,
    err,
    first_few,
    guarded,
    out,
    plural,
    print_skips,
    to_json,
)


@app.command("info")
@guarded
def info_cmd(path: Path | None = typer.Argument(None, metavar="CACHE", show_default=False,
                                               help="The cache (the same as --cache)."),
             cache: Path | None = typer.Option(None, "--cache", show_default="cache/features.h5",
                                               help="HDF5 feature cache."), as_json: bool = JSON,
             failures: bool = typer.Option(False, "--failures", help="List every file that could not be decoded, "
                                           "with the reason.")) -> None:
    """Rows, classes and counts, provenance, failures and size on disk of a cache."""
    from ..backbone import random_weights_note
    from ..cache import list_parts, listed, open_cache

    if path is not None and cache is not None and path != cache:
        raise CatdogError(f"info: the cache {path} and --cache {cache} differ; give one")
    cache = path or cache or Path("cache/features.h5")
    _not_a_head(cache)
    with open_cache(cache) as (view, idx):
        sharded = listed(cache)[0] == 2
        shard_bytes = view.shard_bytes if sharded else []
    parts = len(list_parts(cache, clean=False))  # a killed extract's shards: the next extract lists them
    labels = idx.labels.tolist()
    classes = idx.classes or ["cat", "dog"]  # a cache without labeled folders reads as before classes were recorded
    prov = json.loads(idx.provenance.to_json())
    prov["transform"] = json.loads(prov["transform"])  # an object in JSON, not a string inside it
    summary = {
        "cache": str(cache), "rows": idx.shape[0], "views": idx.shape[1], "dim": idx.shape[2],
        "dtype": idx.dtype, **({"cat": labels.count(0), "dog": labels.count(1)} if classes == ["cat", "dog"]
                               else {}), "unlabeled": labels.count(-1),
        "classes": {c: labels.count(i) for i, c in enumerate(classes)},
        "failed": len(idx.failed), "size_bytes": cache.stat().st_size + sum(shard_bytes), "sources": idx.sources,
        "provenance": prov, "random_weights": bool(random_weights_note([idx.provenance.weights])),
        "incomplete": idx.incomplete, "unassembled_parts": parts,
        "layout": "sharded" if sharded else "single file", "shards": len(shard_bytes), "index_bytes":
            cache.stat().st_size if sharded else 0, "shard_bytes": shard_bytes,
    }
    if failures:
        summary["failures"] = [{"source": idx.sources[s] if 0 <= s < len(idx.sources) else None,
                                "path": os.fsdecode(p), "sha256": sha, "reason": reason}
                               for s, p, sha, reason in idx.failed]
    if as_json:
        print(to_json(summary))
        return
    t = Table(show_header=False, title=escape(printable(str(cache))))
    t.add_row("rows", f"{summary['rows']:,} x {summary['views']} view(s) x {summary['dim']:,}")
    counts = {**summary["classes"], "unlabeled": summary["unlabeled"]}
    if len(counts) > 21:  # a long list of classes in one row: the table stays readable, --json has the counts
        shown = ", ".join(f"{printable(c)} {n:,}" for c, n in list(summary["classes"].items())[:20])
        t.add_row("classes", escape(f"{len(summary['classes'])}: {shown}, …"))
        counts = {"unlabeled": summary["unlabeled"]}
    for k, n in [*counts.items(), ("failed", summary["failed"])]:
        share = f" ({n / summary['rows']:.0%})" if summary["rows"] and k != "failed" else ""
        t.add_row(escape(printable(k)), f"{n:,}{share}")
    t.add_row("size", f"{summary['size_bytes'] / 2**20:.1f} MiB")
    if sharded:  # immutable shards + a small index (catdog-cache compact merges them)
        t.add_row("shards", f"{len(shard_bytes):,} ({min(shard_bytes) / 2**20:.1f}-{max(shard_bytes) / 2**20:.1f} MiB "
                  f"each), index {summary['index_bytes'] / 2**10:.0f} KiB" if shard_bytes else
                  f"0, index {summary['index_bytes'] / 2**10:.0f} KiB")
    for k, v in summary["provenance"].items():
        t.add_row(k, escape(printable(json.dumps(v) if isinstance(v, dict) else str(v))))
    more = "\n(--json lists every one)" if len(idx.sources) > 10 else ""
    t.add_row("sources", escape(first_few(idx.sources, 10, sep="\n") + more))
    if idx.incomplete or parts:
        t.add_row("[yellow]incomplete[/]", escape(_incomplete(idx.incomplete, parts)))
    out.print(t)
    note = random_weights_note([idx.provenance.weights])
    if note:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if idx.incomplete or parts:
        err.print(f"[yellow]warning:[/] {escape(_incomplete(idx.incomplete, parts))}", highlight=False)
    if not failures:
        print_skips("could not be decoded", [(os.fsdecode(p), r) for _, p, _, r in idx.failed],
                     more="--failures lists every one")
        return
    several = len(idx.sources) > 1
    for s, p, _, reason in idx.failed:  # every record, in full, on stdout: `| grep`, `| head` work
        where = f" (in {printable(idx.sources[s])})" if several and 0 <= s < len(idx.sources) else ""
        out.print(f"failed {escape(printable(os.fsdecode(p)))}{escape(where)}: {escape(printable(reason))}",
                  highlight=False, soft_wrap=True)


def _incomplete(folders: list[str], parts: int) -> str:
    what = [f"the extraction of {first_few(folders)} was interrupted"] if folders else []
    what += [f"{plural(parts, 'saved part')} not yet in the cache"] if parts else []
    return f"{' and '.join(what)}: the counts above are partial; run extract again to finish"


def _not_a_head(path: Path) -> None:
    """`info --cache x.head.pt`: say it is a head (and where its features are), never "delete it"."""
    try:  # never waits: a FIFO or /proc/kmsg given as the cache is refused by open_cache, in one line
        if regular_prefix(path, 4) != b"PK\x03\x04":  # torch.save files are zip archives
            return
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return  # read_index says what is wrong
    from ..fit.head import load_head

    try:
        _, meta = load_head(path)
    except CatdogError:
        return
    trained = [c for c in (meta.get("caches") or [meta.get("cache")]) if isinstance(c, str)]
    where = (f"; it was trained on {', '.join(printable(c) for c in trained)}: catdog-cache info "
             f"{shlex.quote(printable(trained[0]))}") if trained else ""
    val = meta.get("val") if isinstance(meta.get("val"), dict) else {}  # fit --val DIR: the folder it validated on
    if isinstance(val.get("folder"), str) and isinstance(val.get("rows"), int):
        where += f"; it was validated on {printable(val['folder'])} ({plural(val['rows'], 'image')}, fit --val)"
    raise CatdogError(f"{path} is a head (written by fit), not a feature cache: give it to predict, preview or "
                      f"export as --head{where}")

