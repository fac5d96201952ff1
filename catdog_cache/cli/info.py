"""`catdog-cache info`: what a cache holds, its provenance and failures; given a head (fit's .head.pt), what it is,
what it was trained on and how it scored."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import CatdogError
from ..files import printable, regular_prefix
from ..store.url import cache_arg
from .common import (
    JSON,
    app,
    err,
    first_few,
    fmt_number,
    guarded,
    out,
    plural,
    print_skips,
    to_json,
)


@app.command("info")
@guarded
def info_cmd(path: Path | None = typer.Argument(None, metavar="CACHE", show_default=False, parser=cache_arg,
                                               help="The cache (the same as --cache), or a head file."),
             cache: Path | None = typer.Option(None, "--cache", show_default="cache/features.h5", parser=cache_arg,
                                               help="HDF5 feature cache."),
             head: Path | None = typer.Option(None, "--head", show_default=False,
                                              help="A head file (fit's .head.pt): its classes, backbone, training "
                                              "and validation scores."), as_json: bool = JSON,
             failures: bool = typer.Option(False, "--failures", help="List every file that could not be decoded, "
                                           "with the reason.")) -> None:
    """Rows, classes and counts, provenance, failures and size on disk of a cache; or what a head is."""
    from ..backbone import random_weights_note
    from ..cache import list_parts, listed, open_cache
    from ..extract.precision import cpu_bf16
    from ..store.staging import readable_cache
    from ..store.url import check_location

    given = [p for p in (path, cache, head) if p is not None]
    if len(set(given)) > 1:
        raise CatdogError(f"info: give one file, got {', '.join(map(str, dict.fromkeys(given)))}")
    shown = check_location(path or cache or head or Path("cache/features.h5"))  # a store URL: read from a local copy
    if head is not None or (isinstance(shown, Path) and is_head_file(shown)):
        summary = head_summary(Path(str(shown)))
        if as_json:
            print(to_json(summary))
        else:
            print_head(summary)
        return
    cache = readable_cache(shown)
    with open_cache(cache) as (view, idx):
        sharded = listed(cache)[0] == 2
        shard_bytes = view.shard_bytes if sharded else []
    parts = len(list_parts(cache, clean=False))  # a killed extract's shards: the next extract lists them
    labels = idx.labels.tolist()
    classes = idx.classes or ["cat", "dog"]  # a cache without labeled folders reads as before classes were recorded
    prov = json.loads(idx.provenance.to_json())
    prov["transform"] = json.loads(prov["transform"])  # an object in JSON, not a string inside it
    summary = {
        "cache": str(shown), "rows": idx.shape[0], "views": idx.shape[1], "dim": idx.shape[2],
        "dtype": idx.dtype, **({"cat": labels.count(0), "dog": labels.count(1)} if classes == ["cat", "dog"]
                               else {}), "unlabeled": labels.count(-1),
        "classes": {c: labels.count(i) for i, c in enumerate(classes)},
        "failed": len(idx.failed), "size_bytes": cache.stat().st_size + sum(shard_bytes), "sources": idx.sources,
        "provenance": prov, "random_weights": bool(random_weights_note([idx.provenance.weights])),
        "incomplete": idx.incomplete, "unassembled_parts": parts,
        "cpu_bf16": cpu_bf16(), "layout": "sharded" if sharded else "single file", "shards": len(shard_bytes),
        "index_bytes":
            cache.stat().st_size if sharded else 0, "shard_bytes": shard_bytes,
    }
    if failures:
        summary["failures"] = [{"source": idx.sources[s] if 0 <= s < len(idx.sources) else None,
                                "path": os.fsdecode(p), "sha256": sha, "reason": reason}
                               for s, p, sha, reason in idx.failed]
    if as_json:
        print(to_json(summary))
        return
    t = Table(show_header=False, title=escape(printable(str(shown))))
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
    t.add_row("bf16 on this CPU", f"native ({summary['cpu_bf16']})" if summary["cpu_bf16"] else "emulated")
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


def is_head_file(path: Path) -> bool:
    """Whether a path given to info is a torch.save zip (a head) rather than an HDF5 cache; never waits: a FIFO or
    /proc/kmsg is refused later, in one line, by whichever reads it."""
    try:
        return regular_prefix(path, 4) == b"PK\x03\x04"
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def _number(value: object) -> int | float | None:
    """A recorded number (from a file: any type), as it was; None unless a finite number (NaN: no validation rows)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None  # type: ignore[return-value]


def _texts(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def head_summary(path: Path) -> dict:
    """What a head is (classes, shape, the backbone of each feature set), what it was trained on (caches, source
    folders, epochs) and how it scored on its validation rows, from the head file alone (checked as predict checks
    it). Recorded fields are read as untrusted: a field of the wrong type is left out."""
    from ..backbone import random_weights_note
    from ..cache import Provenance
    from ..fit.head import load_head

    model, meta = load_head(path)
    provs = [Provenance.from_json(p, f"head {path}") for p in (meta.get("ensemble") or [meta["provenance"]])]
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    history = meta.get("history") if isinstance(meta.get("history"), list) else []
    validation = {"accuracy": _number(metrics.get("val_acc")), "log_loss": _number(metrics.get("val_log_loss")),
                  "train_rows": _number(metrics.get("n_train")), "val_rows": _number(metrics.get("n_val"))}
    if _number(metrics.get("folds")):
        validation["folds"] = _number(metrics.get("folds"))  # cross-fitting: the scores are out-of-fold
    val = meta.get("val") if isinstance(meta.get("val"), dict) else {}  # fit --val DIR: the folder it validated on
    if isinstance(val.get("folder"), str) and _number(val.get("rows")) is not None:
        validation["folder"] = val["folder"]
    transforms = [json.loads(p.transform) for p in provs]
    return {
        "head": str(path), "kind": "head", "shape": model.describe(), "classes": list(meta["classes"]),
        "backbones": [{"arch": p.arch, "layer": p.layer, "weights": p.weights, "views": p.views, "dtype": p.dtype,
                       "precision": p.precision, "transform": t} for p, t in zip(provs, transforms, strict=True)],
        "epochs": _number(config.get("epochs")), "epochs_run": len(history),
        "kept_epoch": _number(meta.get("kept_epoch")), "validation": validation,
        "temperature": _number(meta.get("temperature")), "clip": _number(meta.get("clip")),
        "caches": _texts(meta.get("caches")) or _texts([meta.get("cache")]), "sources": _texts(meta.get("sources")),
        "config": config, "random_weights": bool(random_weights_note([p.weights for p in provs])),
    }


def print_head(s: dict) -> None:
    """info's table for a head: what predict, preview and export will use, and what fit measured."""
    from ..backbone import random_weights_note

    t = Table(show_header=False, title=escape(printable(f"{s['head']} (a head, written by fit)")))
    t.add_row("head", escape(s["shape"]))
    shown = ", ".join(printable(c) for c in s["classes"][:20]) + (", …" if len(s["classes"]) > 20 else "")
    t.add_row("classes", escape(f"{len(s['classes'])}: {shown}"))
    for b in s["backbones"]:
        t.add_row("backbone", escape(printable(f"{b['arch']} {b['layer']}, weights {b['weights']}, views "
                                                f"{b['views']}, {b['dtype']}")))
    run = f"{s['epochs_run']:,}" if s["epochs_run"] else "-"
    kept = f", kept epoch {s['kept_epoch']:.0f}" if s["kept_epoch"] and s["kept_epoch"] != s["epochs_run"] else ""
    t.add_row("epochs", f"{run}{kept}")
    v = s["validation"]
    where = f"out-of-fold ({v['folds']:.0f} folds)" if v.get("folds") else "validation"
    rows = f" on {v['val_rows']:,.0f} rows (trained on {v['train_rows']:,.0f})" if v["val_rows"] is not None else ""
    if v.get("folder"):
        rows += f", the folder {printable(v['folder'])} (fit --val)"
    t.add_row(where, f"accuracy {fmt_number(v['accuracy'] if v['accuracy'] is not None else float('nan'))}, log loss "
              f"{fmt_number(v['log_loss'] if v['log_loss'] is not None else float('nan'))}{rows}")
    if s["temperature"] not in (None, 1.0) or s["clip"]:
        t.add_row("calibration", f"temperature {s['temperature']:.3g}, clip {s['clip'] or 0:g}")
    t.add_row("trained on", escape(first_few(s["caches"], 5, sep="\n") or "-"))
    t.add_row("sources", escape(first_few(s["sources"], 10, sep="\n") or "-"))
    out.print(t)
    note = random_weights_note([b["weights"] for b in s["backbones"]])
    if note:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
