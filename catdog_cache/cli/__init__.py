"""Thin typer CLI: parse options, call one core function, render with rich. Heavy imports (torch) stay inside the
commands so that `--help` is instant. common.py holds what the commands share; one module per command, imported
here in the order `--help` lists them."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from importlib import import_module

from .common import Bar, app, pipe_closed

# Importing a command's module registers it on `app`; `--help` lists the commands in this order.
COMMANDS = ("extract", "fit", "predict", "info", "compact", "backbones", "demo", "verify", "preview", "export",
            "export_features", "audit", "bench")
for _name in COMMANDS:
    import_module(f".{_name}", __name__)

__all__ = ["Bar", "app", "main"]


def main() -> None:
    try:
        app(prog_name="catdog-cache")
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    try:
        sys.stdout.flush()  # buffered output (--json) meets a closed pipe here, after the command returned
    except BrokenPipeError:
        code = pipe_closed()
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        exit_rank(code)
    sys.exit(code)


def exit_rank(code: int | str | None) -> None:
    """End a torchrun rank without the interpreter's teardown. After the process group is destroyed and every
    atexit handler has run, the C++ side's static destructors still abort a rank now and then ("terminate called
    without an active exception", SIGABRT; 3 runs in 57 on this 2-core VM under load, always after atexit), and
    torchrun then fails the whole job. The work is done and written by then: run the atexit handlers, flush, and
    leave with the command's exit code."""
    if isinstance(code, str):  # sys.exit's convention: a message means exit status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):  # a closed pipe or stream: nothing can reach it
            stream.flush()
    os._exit(code or 0)

