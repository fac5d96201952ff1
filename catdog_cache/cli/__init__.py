"""Thin typer CLI: parse options, call one core function, render with rich. Heavy imports (torch) stay inside the
commands so that `--help` is instant. common.py holds what the commands share; one module per command, imported
here in the order `--help` lists them."""

from __future__ import annotations

import sys
from importlib import import_module

from .common import Bar, app, pipe_closed

# Importing a command's module registers it on `app`; `--help` lists the commands in this order.
COMMANDS = ("extract", "fit", "predict", "info", "compact", "backbones", "demo", "verify", "preview", "export", "bench")
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
    sys.exit(code)

