"""How extract shares a CPU's cores between decoding (loader workers) and the forward (the main process's
intra-op threads, or several one-thread streams side by side), decided from what each costs in this run rather than
by a fixed rule.

The work model: an image costs `d` core-ms to decode and, on `c` cores (t threads x s streams), `w` wall-ms of the
forward (c * w core-ms). Loader workers decode on the cores the forward leaves while it runs, and on every core while
it waits: a Gate closes the workers beyond `cores - c` for the length of each forward call, so the two stages never
fight over a core (a descheduled forward thread stalls every op at its barrier). Over a run the forward's share
of the time is phi = rate * w, and the cores decode rate * d = (cores - c) * phi + cores * (1 - phi), so

    rate = min(1 / w, cores / (d + c * w))

and the Pacer picks the shape (threads x streams) and the images per forward call with the highest predicted rate,
from `w` measured on this run's batches and `d` measured in the workers. Measured in the run, the choice follows
the machine as it is: beside other jobs, two forward threads can be slower than one."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# One Gate per loader, shared with its workers through worker_init (fork or spawn): set in each worker process.
_WORKER: tuple[Gate, int] | None = None


def rate(cores: int, decode_ms: float, forward_ms: float, threads: int, workers: int = 1) -> float:
    """Images per second that the model predicts for `threads` forward threads taking `forward_ms` wall-ms per
    image, decoding at `decode_ms` core-ms per image in loader workers (workers=0: in the main process, in turn
    with the forward)."""
    if workers == 0:
        return 1e3 / (decode_ms + forward_ms)
    return 1e3 * min(1 / forward_ms, cores / (decode_ms + threads * forward_ms))


def bound(cores: int, decode_ms: float, forward_core_ms: float) -> float:
    """The machine's work bound in images per second: every core busy with decoding or the forward."""
    return 1e3 * cores / (decode_ms + forward_core_ms)


def thread_counts(cores: int) -> list[int]:
    """The forward thread counts worth measuring: all cores, then halving down to one."""
    out, t = [], cores
    while t >= 1:
        out.append(t)
        t //= 2
    return out if out[-1] == 1 else [*out, 1]


def chunk_sizes(batch: int) -> list[int]:
    """Images per forward call worth measuring: the loader's batch, then halves down to 4 (small networks run
    faster on small batches, whose activations stay in cache)."""
    out = [batch]
    while out[-1] % 2 == 0 and out[-1] // 2 >= 4:
        out.append(out[-1] // 2)
    return out


@dataclass(frozen=True)
class Setting:
    threads: int  # intra-op threads of each forward stream
    chunk: int  # images per forward call
    streams: int = 1  # forward calls at once, on a Python thread each, over equal shares of the batch

    @property
    def cores(self) -> int:
        return self.threads * self.streams


def shapes(cores: int, batch: int) -> list[tuple[int, int]]:
    """(threads, streams) worth measuring: each thread count of thread_counts alone, and as many streams of it as
    fill the cores while each stream still gets 4 images. One-thread streams share nothing: no barrier inside an op
    to wait at, which is where two intra-op threads lose to one (measured on 2 cores: resnet18 fp32 21.2 wall-ms per
    image as two streams, 23.3 on two threads, 41.2 on one; features bit for bit the one-thread forward's)."""
    out = []
    for t in thread_counts(cores):
        out.append((t, 1))
        if cores // t > 1 and batch // (cores // t) >= 4:
            out.append((t, cores // t))
    return out


@dataclass
class Pacer:
    """Chooses the forward's Setting batch by batch. First every shape (threads x streams, `shapes`) once, all at
    the same images per call (the smallest stream's share), and again those within `CLOSE` of the best (a drifting
    load hits all of them); then halved chunks at the best shape while they keep winning, and those close shapes
    once more at the chunk chosen (a small network may run best as two threads on 4 images but as two streams on
    8). After that the chosen setting runs, and the other shapes are measured again at its chunk when its own cost
    moves by more than `DRIFT` (a neighbour's job started or ended) or every `every` batches: each batch on a worse
    shape is time lost, so the search stays short.
    A setting's cost is the median of its last three measurements. A chunk size seen for the first time pays
    one-off set-up (oneDNN builds its kernels per shape): that batch is not measured, nor is a short last batch."""

    CLOSE = 0.8  # a second look for shapes predicted within this fraction of the best rate
    DRIFT = 0.25

    cores: int
    batch: int
    workers: int
    forced: int = 0  # CATDOG_EXTRACT_THREADS: no search over thread counts, one stream
    every: int = 256
    decode_ms: float = 0.0  # core-ms per image, from the workers' meter (the caller keeps it current)
    costs: dict[Setting, deque[float]] = field(default_factory=dict)
    warm: set[int] = field(default_factory=set)
    queue: list[Setting] = field(default_factory=list)
    best: Setting = Setting(1, 1)
    phase: str = "threads"  # then "again", "chunks", "cross", "run"
    done: int = 0
    close: list[tuple[int, int]] = field(default_factory=list)  # shapes within CLOSE of the best at first
    decided: tuple[int, float] = (0, 0.0)  # (batches done, the best's cost) when it was chosen

    def __post_init__(self) -> None:
        self.queue = self._first()
        self.best = self.queue[0]

    def _shapes(self) -> list[tuple[int, int]]:
        return [(self.forced, 1)] if self.forced else shapes(self.cores, self.batch)

    def _first(self) -> list[Setting]:
        chunk = min(self.batch // s for _, s in self._shapes())
        return [Setting(t, chunk, s) for t, s in self._shapes()]

    def _at(self, threads: int, streams: int, chunk: int) -> Setting:
        """The setting of a shape at `chunk` images per call, at most its streams' share of the batch."""
        return Setting(threads, min(chunk, self.batch // streams), streams)

    def next(self) -> Setting:
        """The setting of the next batch. The first (kernel set-up, not measured) runs as the most streams of the
        fewest threads: on a busy machine a forward on several threads stalls at every op's barrier, which a short
        run never recovers, and streams keep every core busy meanwhile."""
        if self.done == 0:
            t, s = max(self._shapes(), key=lambda ts: (ts[1], -ts[0]))
            return Setting(t, self._first()[0].chunk, s)
        if self.phase == "run" and not self.queue and len(self._shapes()) > 1 and self._moved():
            self.queue = [self._at(t, s, self.best.chunk) for t, s in self._shapes()
                          if (t, s) != (self.best.threads, self.best.streams)]
        return self.queue[0] if self.queue else self.best

    def _moved(self) -> bool:
        """Time to measure the other shapes again: the best's own cost moved, or `every` batches passed."""
        at, cost = self.decided
        if self.done - at >= self.every:
            return True
        recent = self.costs.get(self.best)
        return bool(recent) and len(recent) == recent.maxlen and abs(self.cost(self.best) / cost - 1) > self.DRIFT

    def record(self, s: Setting, images: int, seconds: float) -> None:
        """The forward of one loader batch, `images` images at setting `s`, took `seconds` of wall time."""
        self.done += 1
        if s.chunk not in self.warm:
            self.warm.add(s.chunk)
            return
        if images != self.batch:
            return
        self.costs.setdefault(s, deque(maxlen=3)).append(seconds / images * 1e3)
        if self.queue and self.queue[0] == s:
            self.queue.pop(0)
            if not self.queue:
                self._decide()

    def cost(self, s: Setting) -> float:
        return statistics.median(self.costs[s])

    def predicted(self, s: Setting) -> float:
        return rate(self.cores, self.decode_ms, self.cost(s), s.cores, self.workers)

    def _decide(self) -> None:
        # threads, again: each shape at its whole share; chunks: every chunk of the best shape; run: each shape at
        # the chosen chunk
        if self.phase in ("threads", "again"):
            pool = self._first()
        elif self.phase == "chunks":
            pool = [c for c in self.costs if (c.threads, c.streams) == (self.best.threads, self.best.streams)]
        else:
            pool = [self._at(t, s, self.best.chunk) for t, s in self._shapes()]
        pool = [s for s in pool if self.costs.get(s)]
        winner = max(pool, key=self.predicted)
        if self.phase == "threads":
            close = [s for s in pool if self.predicted(s) >= self.CLOSE * self.predicted(winner)]
            self.close = [(s.threads, s.streams) for s in close]
            if len(close) > 1:
                self.phase, self.queue = "again", close
                return
        smaller = [c for c in chunk_sizes(self.batch // winner.streams) if c < winner.chunk]
        keep_halving = self.phase in ("threads", "again") or winner.chunk < self.best.chunk
        self.best = winner
        if self.phase in ("threads", "again", "chunks") and keep_halving and smaller:
            self.phase, self.queue = "chunks", [Setting(winner.threads, smaller[0], winner.streams)]
            return
        cross = [self._at(t, s, winner.chunk) for t, s in self.close if (t, s) != (winner.threads, winner.streams)]
        cross = [s for s in cross if s.chunk != self._first()[0].chunk]  # not measured at this chunk yet
        if self.phase in ("threads", "again", "chunks") and cross:
            self.phase, self.queue = "cross", cross
            return
        self.phase = "run"
        self.decided = (self.done, self.cost(winner))


class Gate:
    """Shared by the main process and its loader workers: worker i decodes only while i < the number of cores the
    forward leaves free (all of them between forward calls), and the workers add up their decoding CPU time."""

    def __init__(self, workers: int, cores: int) -> None:
        ctx = mp.get_context()
        self.cores = cores
        self.open = [ctx.Event() for _ in range(workers)]
        for e in self.open:
            e.set()
        self.meter = ctx.RawArray("d", 2 * max(workers, 1))  # per worker: decode CPU seconds, images

    @contextmanager
    def forward(self, cores: int) -> Iterator[None]:
        """Close the gates of the workers beyond the cores that a forward on `cores` cores leaves, for its length."""
        closed = self.open[max(0, self.cores - cores):]
        for e in closed:
            e.clear()
        try:
            yield
        finally:
            for e in closed:
                e.set()

    def decode_ms(self) -> float:
        """Mean decoding CPU time per image so far, in ms (0 before the first image)."""
        secs, n = sum(self.meter[0::2]), sum(self.meter[1::2])
        return secs / n * 1e3 if n else 0.0


def attach(gate: Gate | None, worker: int) -> None:
    """In a loader worker: the gate it waits at and meters into (worker_init)."""
    global _WORKER
    _WORKER = (gate, worker) if gate is not None else None


@contextmanager
def decoding() -> Iterator[None]:
    """Around one image's decode in a loader worker: wait for the gate, then meter the CPU time it takes."""
    if _WORKER is None:
        yield
        return
    gate, i = _WORKER
    gate.open[i].wait()
    t = time.thread_time()
    try:
        yield
    finally:
        gate.meter[2 * i] += time.thread_time() - t
        gate.meter[2 * i + 1] += 1


def describe(p: Pacer) -> dict[str, Any]:
    """What the pacer measured and chose, for logs and the bench."""
    return {"threads": p.best.threads, "chunk": p.best.chunk, "streams": p.best.streams, "setting": label(p.best),
            "decode_ms": p.decode_ms,
            "forward_ms": {label(s): round(statistics.median(c), 2) for s, c in p.costs.items() if c}}


def label(s: Setting) -> str:
    """'2x8' (threads x images per call), '2 streams of 1x4' (concurrent calls)."""
    return f"{s.threads}x{s.chunk}" if s.streams == 1 else f"{s.streams} streams of {s.threads}x{s.chunk}"
