"""Helpers for tests of inputs that would block: a call with a deadline, a /proc pseudo file."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest


def returns_within(fn, seconds: float = 2.0, unblock: Path | None = None):
    """fn() in a thread; fail if it has not returned in time (first letting a reader blocked on the FIFO `unblock`
    go: a writer opens it and closes it)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        # let every open of the FIFO go, as often as it is opened again: a blocked h5py open holds h5py's lock, and
        # every later test would wait on it
        end = time.monotonic() + 20
        while unblock is not None and t.is_alive() and time.monotonic() < end:
            with contextlib.suppress(OSError):  # no reader waiting now
                os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
            t.join(0.05)
        t.join(10)
        raise AssertionError(f"blocked for more than {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]

def proc_file(name: str) -> str:
    """A /proc pseudo file that stat calls regular and empty (kmsg blocks once read dry); skip if absent."""
    path = f"/proc/{name}"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        pytest.skip(f"{path} cannot be opened here")
    return path
