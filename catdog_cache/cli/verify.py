"""`catdog-cache verify`: end-to-end training against training on the cache."""

from __future__ import annotations

import typer
from rich.table import Table

from .common import (
    BACKBONE,
    BATCH,
    DEVICE,
    DROPOUT,
    HIDDEN,
    LAYER,
    LR,
    SEED,
    VAL_FRACTION,
    WEIGHTS,
    Bar,
    app,
    err,
    guarded,
    hidden_sizes,
    out,
    plural,
)


@app.command("verify")
@guarded
def verify_cmd(
    data_dir: str = typer.Argument(..., metavar="DATA_DIR", help="Labeled image folder, or labeled tar shards as "
                                   "extract takes them (the chosen samples are then held in memory: use --limit)."),
    backbone: str = BACKBONE,
    layer: str = LAYER,
    weights: str = WEIGHTS,
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training rows (each end-to-end pass runs the "
                               "whole network)."),
    batch_size: int = BATCH,
    lr: float = LR,
    dropout: float = DROPOUT,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    hidden: str = HIDDEN,
    limit: int | None = typer.Option(None, "--limit", help="Use this many images, balanced over "
                                       "the classes (half cats, half dogs for two)."),
    dtype: str = typer.Option("float32", "--dtype", help="Cache dtype: float16 reports the deviation."),
    precision: str = typer.Option("fp32", "--precision", help="Extraction precision: fp32 | bf16 | fp16."),
    device: str = DEVICE,
    tolerance: float = typer.Option(1e-5, "--tolerance", help="Max |difference| of probabilities."),
    e2e_seed: int | None = typer.Option(None, "--e2e-seed", hidden=True, help="Test knob: break the agreement."),
) -> None:
    """Train the head end-to-end through the frozen network and on the cache; show they agree."""
    from ..backbone import parse_weights
    from ..extract.config import ExtractConfig
    from ..fit import FitConfig
    from ..verify import verify

    ecfg = ExtractConfig(weights=parse_weights(weights, seed), backbone=backbone, layer=layer, device=device,
                         dtype=dtype, precision=precision, workers=0)
    with Bar() as bar:
        r = verify(data_dir, ecfg, FitConfig(epochs, batch_size, lr, dropout, val_fraction, seed,
                                             hidden=hidden_sizes(hidden)), limit, tolerance, e2e_seed, bar)
    t = Table("", "end-to-end", "cached", "max |difference|", title=f"verify: {plural(r.n_images, 'image')} "
              f"({r.n_val} validation), {plural(r.epochs, 'epoch')}")
    t.add_row("head weights", "", "", f"{r.max_weight_diff:.3g}")
    t.add_row("head biases", "", "", f"{r.max_bias_diff:.3g}")
    t.add_row("val probabilities", "", "", f"{r.max_prob_diff:.3g}")
    t.add_row("head in memory vs streamed from disk", "", "", f"{r.max_streamed_diff:.3g}")
    t.add_row("val predicted labels", "", "", f"{r.differing_labels} differ")
    t.add_row("val loss", f"{r.e2e_loss:.6f}", f"{r.cached_loss:.6f}", f"{abs(r.e2e_loss - r.cached_loss):.3g}")
    t.add_row("val accuracy", f"{r.e2e_acc:.4f}", f"{r.cached_acc:.4f}", "")
    t.add_row("wall time", f"{r.e2e_seconds:.2f}s",
              f"{r.extract_seconds + r.fit_seconds:.2f}s (extract {r.extract_seconds:.2f}s + fit {r.fit_seconds:.2f}s)",
              f"speedup {r.speedup:.1f}x")
    out.print(t)
    if not r.identity_expected:
        out.print(f"[yellow]{dtype} cache / {precision} extraction:[/] measured deviation {r.max_prob_diff:.3g} "
                  "in probabilities; identity is only claimed for a float32 cache with fp32 extraction")
        return
    if r.agree:
        out.print(f"[green]agree[/] within {r.tolerance:g}: training on the cache is training the network's head")
        return
    err.print(f"[bold red]disagree:[/] max probability difference {r.max_prob_diff:.3g} > {r.tolerance:g}, "
              f"{r.differing_labels} labels differ, or the streamed head differs by {r.max_streamed_diff:.3g}")
    raise typer.Exit(1)

