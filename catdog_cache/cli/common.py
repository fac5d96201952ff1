"""Shared by every command: the typer app, the consoles, option constants, `guarded` (errors as one line), the
progress `Bar`, JSON and skip-list rendering."""

from __future__ import annotations

import errno
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from .. import __version__
from ..errors import CatdogError
from ..files import json_text, plural, printable, short
from ..store.url import cache_arg

# Plain click help: flags shown as flags (typer's rich help prints <bool> for them with click 8.5), short usage
# errors, no box drawing in logs.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Cache frozen ImageNet features (VGG16 fc7 by default) once in HDF5; train the head in seconds.")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich would exit 1 here; `guarded` exits as a Unix tool whose reader left (`| head`) does."""
        self.quiet = True  # nothing more to write
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


# In a terminal, rich wraps to its width; in logs and pipes every message stays on one line.
out = _Console(soft_wrap=not sys.stdout.isatty(), width=None if sys.stdout.isatty() else 160)  # tables unsqueezed
err = _Console(stderr=True, soft_wrap=not sys.stderr.isatty(), width=None if sys.stderr.isatty() else 160)

# --cache is parsed once (store/url.py): a local path, or an object-store URL (s3://..., memory://...)
CACHE = typer.Option(Path("cache/features.h5"), "--cache", parser=cache_arg,
                     help="HDF5 feature cache: a path, or a URL (s3://bucket/run/features.h5; pip install "
                     "'catdog-cache[remote]').")
HEAD = typer.Option(None, "--head", show_default="beside the cache: cache/features.head.pt",
                    help="Trained head file.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")
WORKERS = typer.Option(-1, "--workers", help="Decode workers (-1: sized to the cores).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or tables; the summary line stays.")
JSON = typer.Option(False, "--json", help="Print one JSON summary for scripts.")
BACKBONE = typer.Option("vgg16", "--backbone", help="Frozen network: vgg16, efficientnet_lite0/1/2, any torchvision "
                        "classifier (resnet50, convnext_tiny...), timm:NAME. See `catdog-cache backbones`.")
LAYER = typer.Option("", "--layer", show_default="the backbone's default (vgg16: fc7)",
                     help="vgg16: fc7 | fc6 | pool5; torchvision models: a graph node name.")
WEIGHTS = typer.Option("imagenet", "--weights", help="imagenet (the backbone's pretrained weights) | random | a "
                       "state-dict file.")
# Training options shared by fit and verify (verify must be able to train exactly as fit does).
EPOCHS = typer.Option(None, "--epochs", show_default="until the validation loss stops falling: 20 epochs or more, "
                      "more only up to 3,000 Adam steps; without validation, 1,000 steps",
                      help="Passes over the training rows.")
BATCH = typer.Option(128, "--batch-size", help="Rows per Adam step.")
LR = typer.Option(1e-3, "--lr", help="Adam learning rate.")
DROPOUT = typer.Option(0.5, "--dropout", help="Dropout probability (before the final Linear, or after each hidden).")
VAL_FRACTION = typer.Option(0.2, "--val-fraction", help="Share of each class held out (hash of the path).")
SEED = typer.Option(0, "--seed", help="Seed for init, batch order, dropout masks and the split.")
HIDDEN = typer.Option("", "--hidden", help="MLP head: hidden sizes, e.g. 512 or 1024,256 (default: linear head).")


def first_few(items: list[str], limit: int = 5, sep: str = ", ") -> str:
    """'a, b' or 'a, b, c, d, e and 9,995 more': a cache of 10,000 tar shards has 10,000 sources, and a summary
    line (or `info`'s table) listing all of them is 300 KB nobody reads; --json keeps every one."""
    shown = sep.join(printable(s) for s in items[:limit])
    return shown if len(items) <= limit else f"{shown}{sep}and {len(items) - limit:,} more"


def source_noun(sources: list[str], n: int | None = None) -> str:
    """'folder' / 'shard' / 'input' (a mix), pluralised for n (default: len(sources)): a cache's sources are
    folders of files or tar shards (a path or URL ending in .tar)."""
    tars = sum(s.endswith(".tar") for s in sources)
    word = "shard" if tars == len(sources) and sources else "folder" if tars == 0 else "input"
    return plural(len(sources) if n is None else n, word)


def hidden_sizes(text: str) -> tuple[int, ...]:
    from ..errors import InputError

    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise InputError(f"--hidden: expected sizes like 512 or 1024,256, got {text!r}") from None


def version_callback(value: bool) -> None:
    if value:
        print(f"catdog-cache {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    """Cache frozen ImageNet features once in HDF5; train the head in seconds; predict and submit to Kaggle."""


PIPE_CLOSED = 128 + 13  # what a shell reports for a tool killed by SIGPIPE


def pipe_closed() -> int:
    """stdout's reader is gone: point stdout at /dev/null so that no later flush (rich's, or Python's at exit)
    complains, and exit as a Unix tool killed by SIGPIPE would."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. under a test runner)
        pass
    return PIPE_CLOSED


# The file in an OSError is often one the user never named (a cache's lock or shard, a head's temp file, beside
# the path they gave): say what to change.
_WRITE = " (check that location's permissions, or give --cache / --head / the output elsewhere)"
OS_HINTS = {errno.EACCES: _WRITE, errno.EPERM: _WRITE, errno.EROFS: " (a read-only file system: give --cache / "
            "--head / the output elsewhere)", errno.EEXIST: " (a file has the name a folder needs: give another path)",
            errno.ENOTDIR: " (a file stands where the path needs a folder: give another path)",
            errno.ENOSPC: " (free some space, or give --cache / the output on another disk)"}


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes become one clear line and a non-zero exit, never a traceback; with --json, that line is a JSON
    object on stdout, {"error": "..."}, so that a script reading the output always reads JSON."""

    def fail(message: str, code: int, as_json: bool) -> typer.Exit:
        if as_json:
            print(to_json({"error": message}))
        else:
            err.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
        return typer.Exit(code)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json") is True
        try:
            return fn(*args, **kwargs)
        except CatdogError as e:
            raise fail(str(e), e.exit_code, as_json) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `catdog-cache ... | head`: the reader left; quiet, as other Unix tools
            raise typer.Exit(pipe_closed()) from None
        except OSError as e:  # disk full, read-only or missing location: the OS's words, the file, what to do
            where = f": {e.filename}{OS_HINTS.get(e.errno, '')}" if e.filename else ""
            raise fail(f"{e.strerror or e}{where}", 1, as_json) from None

    return wrapper


class Bar:
    """Progress callback (stage, done, total) rendered as rich bars with images/s and ETA. When stderr is not a
    terminal (`> log 2>&1`, a batch job), a plain line with the rate and ETA every `log_seconds` instead: a log that
    stays silent for an hour looks like a hang."""

    log_seconds = 30.0  # between progress lines in logs; tests patch it
    units = {"extract": "img/s", "predict": "img/s", "preview": "img/s", "hash": "files/s", "fit": "epochs/s",
             "end-to-end epochs": "epochs/s", "shards": "shards/s", "val": "img/s"}

    def __init__(self, quiet: bool = False) -> None:
        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TextColumn("[cyan]{task.fields[rate]}"),
                                 TimeRemainingColumn(), console=err, transient=False,
                                 disable=quiet or not err.is_terminal)  # logs get lines, not bar frames
        self.tasks: dict[str, Any] = {}
        self.log = not quiet and not err.is_terminal
        self.clock: dict[str, tuple[float, int, float, bool]] = {}  # stage -> (t0, done at t0, last line, any line)

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.log:
            self._line(stage, done, total)
            return
        if stage not in self.tasks or self.progress.tasks[self.tasks[stage]].total != total:
            self.tasks[stage] = self.progress.add_task(stage, total=total, rate="")
        task = self.tasks[stage]
        self.progress.update(task, completed=done, total=total)
        speed = self.progress.tasks[task].speed
        unit = self.units.get(stage)
        self.progress.update(task, rate=f"{speed:.1f} {unit}" if speed and unit else "")

    def _line(self, stage: str, done: int, total: int) -> None:
        """One log line per `log_seconds`, and a last one at the end of a stage that printed any."""
        now = time.monotonic()
        t0, done0, last, spoke = self.clock.get(stage, (now, done, now, False))
        if stage not in self.clock or done < done0:  # a new stage, or a new pass of it (fit --folds)
            t0, done0, last, spoke = now, done, now, False
        self.clock[stage] = (t0, done0, last, spoke)
        if now - last < self.log_seconds and not (spoke and done >= total):
            return
        rate = (done - done0) / (now - t0) if now > t0 and done > done0 else 0.0
        eta = f", ETA {_duration((total - done) / rate)}" if rate and done < total else ""
        speed = f", {rate:.1f} {self.units.get(stage, 'items/s')}" if rate else ""
        share = f" ({done / total:.0%})" if total else ""
        err.print(f"{stage} {done:,}/{total:,}{share}{speed}{eta}", highlight=False, soft_wrap=True)
        self.clock[stage] = (t0, done0, now, True)


def worst_line(w: dict[str, Any]) -> str:
    """One of calibration.worst_rows: path, label, the probability given to it, what was predicted, the loss."""
    label, pred = escape(printable(w["label"])), escape(printable(w["predicted"]))
    said = f", predicted {pred} ({w['p_predicted']:.4f})" if w["predicted"] != w["label"] else ""
    return (f"  {escape(printable(w['path']))}: labeled {label}, P({label}) {w['p_label']:.4f}{said}, "
            f"log loss {w['log_loss']:.2f}")


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def to_json(obj: Any) -> str:
    """Strict JSON for scripts: NaN (e.g. no validation images of a class) becomes null; a file name that is not
    UTF-8 is escaped recoverably (files.json_text), never emitted as lone surrogates."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, str):
            return json_text(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False)


def print_skips(title: str, items: list[tuple[str, str]], limit: int = 10, more: str = "--json lists every one"
                 ) -> None:
    """The first `limit` files and why; paths shortened in the middle (a 4 KB path is not a useful log line)."""
    if not items:
        return
    err.print(f"[yellow]{plural(len(items), 'file')} {title}[/]")
    for rel, reason in items[:limit]:
        err.print(f"  [yellow]skip[/] {escape(short(printable(rel)))}: {escape(short(printable(reason), 240))}",
                  highlight=False)
    if len(items) > limit:
        err.print(f"  … and {len(items) - limit} more ({escape(more)})", highlight=False)


def failures_hint(cache: Path | list[Path] | None) -> str:
    caches = cache if isinstance(cache, list) else [cache] if cache else []
    if not caches:  # predict --model keeps no cache
        return "--json lists every one"
    return f"`catdog-cache info --cache {short(printable(shlex.quote(str(caches[0]))))} --failures` lists every one"


APPEND = "; appending: the cache's own"  # a flag left out when adding to a cache takes the cache's setting



def fmt_number(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if x == x else "-"  # NaN: no validation rows

