"""How extract shares a CPU's cores between decoding (loader workers) and the forward (the main process's
intra-op threads), decided from what each costs in this run rather than by a fixed rule.

The work model: an image costs `d` core-ms to decode and, with `t` forward threads, `w_t` wall-ms of the forward
(t * w_t core-ms). Loader workers decode on the cores the forward leaves while it runs, and on every core while it
waits: a Gate closes the workers beyond `cores - t` for the length of each forward call, so the two stages never
fight over a core (a descheduled forward thread stalls every op at its barrier). Over a run the forward's share
of the time is phi = rate * w_t, and the cores decode rate * d = (cores - t) * phi + cores * (1 - phi), so

    rate(t) = min(1 / w_t, cores / (d + t * w_t))

and the Pacer picks the thread count (and the images per forward call) with the highest predicted rate, from
`w_t` measured on this run's batches and `d` measured in the workers. Measured in the run, the choice follows
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
    threads: int  # intra-op threads of the forward
    chunk: int  # images per forward call


@dataclass
class Pacer:
    """Chooses the forward's Setting batch by batch. First every thread count at the loader's batch (two measured
    batches each, interleaved), then halved chunks at the best thread count while they keep winning; every `every`
    batches after that, the other thread counts are measured again at the chosen chunk, so that a change of load
    is followed.
    A setting's cost is the median of its last three measurements. A chunk size seen for the first time pays
    one-off set-up (oneDNN builds its kernels per shape): that batch is not measured, nor is a short last batch."""

    cores: int
    batch: int
    workers: int
    forced: int = 0  # CATDOG_EXTRACT_THREADS: no search over thread counts
    every: int = 32
    decode_ms: float = 0.0  # core-ms per image, from the workers' meter (the caller keeps it current)
    costs: dict[Setting, deque[float]] = field(default_factory=dict)
    warm: set[int] = field(default_factory=set)
    queue: list[Setting] = field(default_factory=list)
    best: Setting = Setting(1, 1)
    phase: str = "threads"  # then "chunks", then "run"
    done: int = 0

    def __post_init__(self) -> None:
        threads = [Setting(t, self.batch) for t in self._threads()]
        self.queue = threads * 2 if len(threads) > 1 else threads  # interleaved twice: a drifting load hits all
        self.best = self.queue[0]

    def _threads(self) -> list[int]:
        return [self.forced] if self.forced else thread_counts(self.cores)

    def next(self) -> Setting:
        """The setting of the next batch. The first (kernel set-up, not measured) runs on the fewest threads: on a
        busy machine a forward on several threads stalls at every op's barrier, which a short run never recovers."""
        if self.done == 0:
            return Setting(self._threads()[-1], self.batch)
        if self.phase == "run" and not self.queue and self.done % self.every == 0 and len(self._threads()) > 1:
            self.queue = [Setting(t, self.best.chunk) for t in self._threads() if t != self.best.threads]
        return self.queue[0] if self.queue else self.best

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
        return rate(self.cores, self.decode_ms, self.cost(s), s.threads, self.workers)

    def _decide(self) -> None:
        # threads: the loader's batch; chunks: every chunk measured at the best thread count; run: the chosen chunk
        chunk = {"threads": self.batch, "chunks": 0}.get(self.phase, self.best.chunk)
        pool = [s for s in self.costs if self.costs[s] and (not chunk or s.chunk == chunk)]
        if self.phase == "chunks":
            pool = [s for s in pool if s.threads == self.best.threads]
        winner = max(pool, key=self.predicted)
        smaller = [c for c in chunk_sizes(self.batch) if c < winner.chunk]
        keep_halving = self.phase == "threads" or winner.chunk < self.best.chunk
        self.best = winner
        if self.phase in ("threads", "chunks") and keep_halving and smaller:
            self.phase, self.queue = "chunks", [Setting(winner.threads, smaller[0])]
        else:
            self.phase = "run"


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
    def forward(self, threads: int) -> Iterator[None]:
        """Close the gates of the workers beyond the cores that `threads` forward threads leave, for the forward."""
        closed = self.open[max(0, self.cores - threads):]
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


def split(cores: int, decode_ms: float, costs: dict[int, float], workers: int = 1) -> int:
    """The forward thread count with the highest predicted rate, given its measured wall-ms per image at each
    thread count (the Pacer's decision, for one chunk size)."""
    return max(costs, key=lambda t: rate(cores, decode_ms, costs[t], t, workers))


def describe(p: Pacer) -> dict[str, Any]:
    """What the pacer measured and chose, for logs and the bench."""
    return {"threads": p.best.threads if p.best else 0, "chunk": p.best.chunk if p.best else 0,
            "decode_ms": p.decode_ms, "forward_ms": {f"{s.threads}x{s.chunk}": round(statistics.median(c), 2)
                                                     for s, c in p.costs.items() if c}}
