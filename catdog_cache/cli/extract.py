"""`catdog-cache extract`: run the frozen backbone over a folder or tar shards once, store the features."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from ..files import folders_kept_only_if_used, printable
from .common import (
    APPEND,
    BACKBONE,
    CACHE,
    DEVICE,
    JSON,
    LAYER,
    QUIET,
    WEIGHTS,
    WORKERS,
    Bar,
    app,
    err,
    failures_hint,
    guarded,
    out,
    plural,
    print_skips,
    to_json,
)


@app.command("extract", context_settings={"allow_extra_args": True})  # several INPUTs: see one_input
@guarded
def extract_cmd(
    ctx: typer.Context,
    data_dir: str = typer.Argument(..., metavar="INPUT",
                                   help="Image folder (one sub-folder per class, e.g. cat/ + dog/; cat.N.jpg files; "
                                   "or unlabeled), or WebDataset tar shards: a .tar, a brace pattern "
                                   "(shards/train-{000000..000099}.tar), a text file listing shards, or URLs (s3://, "
                                   "gs://, https://: pip install 'catdog-cache[remote]')."),
    cache: Path = CACHE,
    backbone: str | None = typer.Option(None, "--backbone", show_default="vgg16" + APPEND, help=BACKBONE.help),
    layer: str | None = typer.Option(None, "--layer", show_default="the backbone's default (vgg16: fc7)" + APPEND,
                                     help=LAYER.help),
    weights: str | None = typer.Option(None, "--weights", show_default="imagenet" + APPEND, help=WEIGHTS.help),
    seed: int | None = typer.Option(None, "--seed", show_default="0" + APPEND, help="Seed for --weights random."),
    device: str = DEVICE,
    batch_size: int = typer.Option(0, "--batch-size", help="Images per forward pass (0: 16 on CPU, 128 on GPU)."),
    workers: int = WORKERS,
    dtype: str | None = typer.Option(None, "--dtype", show_default="float32" + APPEND,
                                     help="Storage dtype: float32 | float16 (half the file)."),
    precision: str | None = typer.Option(None, "--precision", show_default="fp32" + APPEND,
                                         help="Backbone compute: fp32 | bf16 | fp16 | auto (bf16 on a CPU "
                                         "with bf16 instructions, else fp32; the cache records the value used)."),
    views: str | None = typer.Option(None, "--views", show_default="center" + APPEND,
                                     help="Comma-separated views per image: center, flip."),
    decoder: str | None = typer.Option(None, "--decoder", show_default="pil" + APPEND,
                                       help="pil (CPU workers) | pil-draft (big JPEGs decoded at 1/2-1/8 scale in the "
                                       "DCT, still >= the resize: faster, other pixels) | torchvision (JPEGs decoded "
                                       "in batches on the extraction device: nvJPEG on a GPU). Recorded in the cache."),
    prune: bool = typer.Option(False, "--prune", help="Remove rows of files no longer in the folder."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any file that cannot be used."),
    checksum: bool = typer.Option(False, "--checksum", help="Hash every already-cached file to find changes (as "
                                  "rsync -c), instead of trusting an unchanged size, mtime, inode, device and ctime; "
                                  "tar shards are all read again."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
    part_rows: int = typer.Option(1024, "--part-rows", hidden=True, help="Rows per crash-safe part."),
    engine: str = typer.Option("local", "--engine", help="local (this process; torchrun for several GPUs of one "
                               "node) | ray (a Ray cluster: one retried task per input shard, resumable)."),
    ray_address: str | None = typer.Option(None, "--ray-address", show_default="$RAY_ADDRESS, else a local Ray",
                                           help="Ray cluster to run on (--engine ray)."),
    shard_size: int | None = typer.Option(None, "--shard-size", show_default="a few per actor, 32 to 1000",
                                          help="Files per input shard: Ray's unit of work, retry and resume."),
    actors: int | None = typer.Option(None, "--actors", show_default="as many as the GPUs (or CPUs) hold",
                                      help="Backbone actors (--engine ray)."),
    gpus_per_actor: float | None = typer.Option(None, "--gpus-per-actor", show_default="1 when there are GPUs",
                                                help="GPU share per actor, e.g. 0.5: two actors per GPU."),
    cpus_per_actor: float | None = typer.Option(None, "--cpus-per-actor", show_default="1",
                                                help="CPUs per actor; beyond the first, decode workers."),
    classes: str | None = typer.Option(None, "--classes", show_default="the cache's classes, else cat,dog",
                                       help="Tar shards: the class names, comma-separated, in the order of the .cls "
                                       "indexes (0 first); keys in folders of these names get their label too."),
) -> None:
    """Run the frozen backbone over every image once and store its features. Adding to an existing cache needs no
    repeated flags: options left out take the cache's recorded settings; only contradicting ones are refused."""
    from ..backbone import parse_weights
    from ..store.url import check_location
    from .precheck import engine as check_engine
    from .precheck import extract_inputs

    cache = check_location(cache)  # first: a URL is never written as a local folder named "s3:"
    data_dir = one_input([data_dir, *ctx.args])
    extract_inputs(data_dir, backbone, layer, device)  # before torch's import: mistakes answered at once
    check_engine(engine, {"--ray-address": ray_address, "--shard-size": shard_size, "--actors": actors,
                          "--gpus-per-actor": gpus_per_actor, "--cpus-per-actor": cpus_per_actor})
    from ..engines.dispatch import extract
    from ..extract.config import ExtractConfig
    from ..settings import resolve_settings
    from ..store.staging import writable_cache

    # a store URL: a staging copy, uploaded as it is written (under torchrun: one copy for the node's ranks)
    with writable_cache(cache, "extract", engine, device) as local:
        o = resolve_settings(local, backbone=backbone, layer=layer, weights=weights, seed=seed, views=views,
                             dtype=dtype, precision=precision, decoder=decoder)
        cfg = ExtractConfig(weights=parse_weights(o.weights, o.seed), backbone=o.backbone, layer=o.layer,
                            device=device, batch_size=batch_size, workers=workers, dtype=o.dtype,
                            precision=o.precision, views=tuple(v.strip() for v in o.views.split(",") if v.strip()),
                            decoder=o.decoder, part_rows=part_rows)
        names = classes.split(",") if classes is not None else None
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
            extract(data_dir, local, cfg, prune=prune, strict=strict, checksum=checksum, classes=names)
            return
        opts = None
        if engine == "ray":
            from ..engines.ray_pool import RayOptions

            given = {k: v for k, v in {"address": ray_address, "shard_size": shard_size, "actors": actors,
                                       "gpus_per_actor": gpus_per_actor, "cpus_per_actor": cpus_per_actor}.items()
                     if v is not None}
            opts = RayOptions(**given)  # type: ignore[arg-type]
        with folders_kept_only_if_used(local), Bar(quiet or as_json) as bar:
            r = extract(data_dir, local, cfg, progress=bar, prune=prune, strict=strict, checksum=checksum,
                        classes=names, engine=engine, ray=opts)
    ray = {"shards": r.shards, "shards_run": r.shards_run, "actors": r.actors, "shard_size": r.shard_size} \
        if engine == "ray" else {}
    if as_json:
        print(to_json({"cache": str(cache), "rows": r.rows, "found": r.found, "extracted": r.extracted,
                       "reused": r.reused, "hashed": r.hashed, "failed": r.failed, "skipped": r.skipped,
                     "removed": r.removed, "pruned": r.pruned, "seconds": r.seconds, "layout": r.layout,
                     "warnings": r.warnings, **ray}))
        return
    for w in r.warnings:
        err.print(f"[yellow]warning:[/] {escape(printable(w))}")
    print_skips("skipped while scanning", r.skipped)
    print_skips("could not be decoded", r.failed, more=failures_hint(cache))
    if r.removed:
        verb = "removed from the cache" if r.pruned else "cached but gone from the folder (--prune removes them)"
        err.print(f"[yellow]{plural(len(r.removed), 'file')} {verb}[/]")
    rate = f" ({r.extracted / r.seconds:.1f} img/s)" if r.extracted else ""
    hashed = f" ({r.hashed:,} read to check)" if r.hashed else ""  # the others: unchanged by their stat
    out.print(f"[green]extracted[/] {r.extracted:,} new, reused {r.reused:,}{hashed}, failed {len(r.failed):,} -> "
              f"{plural(r.rows, 'row')} in {escape(printable(str(cache)))} in {r.seconds:.1f}s{rate}", highlight=False)
    if ray and ray["shards_run"]:
        others = ray["shards"] - ray["shards_run"]
        done = "" if not others else "; the other was done already" if others == 1 else \
            "; the others were done already"
        size = f" of {plural(ray['shard_size'], 'file')}" if ray["shard_size"] else ""  # tar shards: as they are
        out.print(f"ray: {ray['shards_run']:,} of {plural(ray['shards'], 'input shard')}{size} run on "
                  f"{plural(ray['actors'], 'actor')}{done}", highlight=False)
    elif ray:
        done = "the input shard was" if ray["shards"] == 1 else f"all {ray['shards']:,} input shards were"
        out.print(f"ray: {done} done already; no task ran", highlight=False)


def one_input(inputs: list[str]) -> str:
    """extract takes one INPUT. Several are most often an unquoted brace pattern the shell expanded (bash turns
    shards/train-{000000..000099}.tar into 100 words) or a folder glob: say how to give them as one."""
    if len(inputs) == 1:
        return inputs[0]
    from ..errors import InputError

    shown = ", ".join(printable(i) for i in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
    if all(i.endswith(".tar") for i in inputs):
        raise InputError(f"extract takes one INPUT and got {len(inputs):,} tar shards ({shown}): quote the brace "
                         "pattern so the shell leaves it alone ('shards/train-{000000..000099}.tar'), or list the "
                         "shards in a text file, one per line, and give that")
    raise InputError(f"extract takes one INPUT (a folder, a tar shard, a quoted brace pattern or a listing) and got "
                     f"{len(inputs):,} ({shown}): extract each folder in its own run (the same --cache adds to it)")
