"""The next step's batch prepared on a second core while this step runs: a linear head's step on the host is two
BLAS passes and a few tiny ops, and gathering its 128 random rows and drawing and applying the dropout mask cost
about as much again, all of it memory work on one core while the other one idles (docs/performance.md)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from ..machine import affinity_cores

T = TypeVar("T")
R = TypeVar("R")

RING = 3  # buffers a prepared batch may use at once: the one stepped on, one queued, one being prepared


def spare_core() -> bool:
    """Whether this process may run on more than one core (its CPU affinity, a container's or taskset's share)."""
    return affinity_cores() > 1


def ahead(items: Iterable[T], work: Callable[[T], R], depth: int = 1) -> Iterator[R]:
    """work(item) for each item, in order, on a thread of its own that runs at most `depth` results ahead of the
    consumer (so at most depth + 2 results are alive: see RING). Its error is raised here; closing the generator
    stops the thread."""
    q: queue.Queue[tuple[bool, object]] = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> None:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                put((True, work(item)))
            put((False, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=run, name="fit-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = q.get()
            if not ok:
                if value is not None:
                    raise value  # type: ignore[misc]
                return
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def take(rings: dict, turns: dict, key: object, ring: int, new: Callable[[], R]) -> R:
    """The next of `ring` reused buffers under `key`, in turn, each made by `new` when first needed: a buffer comes
    back after `ring` calls (a fresh 2 MB tensor per step costs more in page faults than filling it)."""
    buffers = rings.setdefault(key, [])
    i = (turns.get(key, -1) + 1) % ring
    turns[key] = i
    while len(buffers) <= i:
        buffers.append(new())
    return buffers[i]
