"""`catdog-cache bench`: the measurements behind the README's tables."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..errors import CatdogError
from .common import (
    app,
    guarded,
    out,
)


@app.command("bench")
@guarded
def bench_cmd(
    data: Path | None = typer.Option(None, "--data", show_default="images drawn by the bench",
                                     help="JPEG folder for the extract measurements."),
    limit: int = typer.Option(64, "--limit", help="Images for the end-to-end extract measurement."),
    rows: int = typer.Option(25_000, "--rows", help="Rows of the synthetic cache for fit."),
    stream: str = typer.Option("25000,100000", "--stream", help="Cache sizes for streamed fit ('' to skip)."),
    backbones: str = typer.Option("", "--backbones", show_default="vgg16; the table: vgg16,efficientnet_lite0",
                                  help="Backbones for the extract rows, comma-separated."),
    markdown: bool = typer.Option(False, "--markdown", help="Also print a README-ready table."),
    only: str = typer.Option("", "--only", help="'pipeline': only the extract-pipeline rows; 'bound': extract on "
                             "the CPU against its work bound (cores / decode + forward core-ms, measured alone in "
                             "the same run) per --backbones (default vgg16,resnet18,efficientnet_lite0), fp32 and "
                             "bf16, on --data or --pipeline-images drawn photos; 'rerun': only the "
                             "rerun of an unchanged folder against a plain scandir + stat walk of it; 'scale': only "
                             "a head streamed from large synthetic sharded caches (--scale-rows); 'tars': tar "
                             "input against the same images as a folder (--pipeline-images or --data), and the bytes "
                             "an append to a 20,000-row cache writes."),
    rerun_files: int = typer.Option(100_000, "--rerun-files", help="Files of the folder of the rerun rows."),
    scale_rows: str = typer.Option("100000,1000000", "--scale-rows", help="--only scale: synthetic cache sizes "
                                   "(rows of 1280-d float16; 10M rows take 25.6 GB of disk, deleted afterwards)."),
    scale_budget: str = typer.Option("256M", "--scale-budget", help="--only scale: memory for the streamed "
                                     "chunks (fit's --max-memory: this + the index and the per-row arrays)."),
    scale_dir: Path | None = typer.Option(None, "--scale-dir", show_default="the temp folder",
                                          help="--only scale: where the synthetic caches are written."),
    scale_keep: bool = typer.Option(False, "--scale-keep", help="--only scale: keep the synthetic caches in "
                                    "--scale-dir and reuse a finished one of the same size (10M rows: 25.6 GB)."),
    pipeline: int = typer.Option(1000, "--pipeline-images", help="Drawn 500x375 JPEGs for the extract-pipeline "
                                 "rows (with --data: its images instead; 0 skips the rows)."),
    workers: int = typer.Option(-1, "--workers", help="Decode workers for the pipeline rows (-1: extract's default)."),
    batch_size: int = typer.Option(0, "--batch-size", help="Batch for the pipeline rows (0: extract's default)."),
    device: str = typer.Option("cpu", "--device", help="Device of the pipeline rows: cpu or cuda."),
    table_rows: bool = typer.Option(False, "--table", help="The extract table (per backbone, decoder, precision, "
                                    "against the plain loop and the decode and model ceilings): always with "
                                    "--device cuda."),
    repeats: int = typer.Option(0, "--repeats", help="Interleaved fresh-process runs per pipeline row, median "
                                "reported (0: 3 for the CPU rows, 1 for the table's 18 runs)."),
) -> None:
    """Measure GEMM and copy rates, backbone forward, extract end to end, fit (quiet and under load), start-up,
    and extract against a plain DataLoader loop (tiny backbone: the pipeline's own cost); on a GPU, the extract
    table (per backbone, decoder and precision, against the plain loop and the decode and model ceilings)."""
    import platform
    from datetime import date

    import torch

    from ..backbone import check_device
    from ..bench import pipeline as benchpipe
    from ..bench.suite import run

    check_device(device)
    if only not in ("", "pipeline", "bound", "rerun", "scale", "tars"):
        raise CatdogError(f"--only: expected pipeline, bound, rerun, scale or tars, got {only!r}")
    if rerun_files < 1:
        raise CatdogError(f"--rerun-files must be at least 1, got {rerun_files}")
    out.print(f"bench on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {date.today()}")
    try:
        sizes = [int(x) for x in stream.split(",") if x.strip()]
    except ValueError:
        raise CatdogError(f"--stream: expected comma-separated row counts, got {stream!r}") from None

    def log(r: tuple[str, str, str]) -> None:
        out.print(f"  {r[0]:<48} {r[1]:>18}  {r[2]}", highlight=False)

    if repeats < 0:
        raise CatdogError(f"--repeats must be at least 1 (or 0 for auto), got {repeats}")
    names = [b.strip() for b in backbones.split(",") if b.strip()]
    table = [] if only else run(data, limit, rows, log, sizes, names or ["vgg16"])
    if only == "rerun":
        from ..bench import rerun as benchrerun

        table += benchrerun.run(rerun_files, log)
    elif only == "scale":
        from ..bench import scale as benchscale
        from ..fit.data import parse_size

        try:
            scale = [int(x) for x in scale_rows.split(",") if x.strip()]
        except ValueError:
            raise CatdogError(f"--scale-rows: expected comma-separated row counts, got {scale_rows!r}") from None
        if not scale or min(scale) < 1000:
            raise CatdogError(f"--scale-rows: give row counts of at least 1000, got {scale_rows!r}")
        parse_size(scale_budget)  # a bad size is one line here, not a child's traceback
        if scale_keep and scale_dir is None:
            raise CatdogError("--scale-keep keeps 25.6 GB per 10M rows: give the folder for them as --scale-dir")
        table += benchscale.run(scale, log, scale_budget, folder=scale_dir, keep=scale_keep)
    elif only == "bound":
        from ..bench import bound as benchbound

        table += benchbound.run(data, pipeline or 400, log, names or None, repeats=repeats or 3)
    elif only == "tars":
        from ..bench import tars as benchtars

        table += benchtars.run(data, pipeline or 400, log, repeats or 3)
    elif pipeline and (table_rows or device.startswith("cuda")):
        table += benchpipe.table(data, pipeline, log, device, names or None, workers, batch_size, repeats or 1)
    elif pipeline:
        table += benchpipe.run(data, pipeline, workers, batch_size, device, log, repeats or 3)
    if markdown:
        print("| measurement | value | note |\n|---|---|---|")
        for what, value, note in table:
            print(f"| {what} | {value} | {note} |")

