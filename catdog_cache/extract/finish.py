"""The end of every engine's run: the cache shards on disk listed in the index (finish_run), also when Ctrl-C ends
it early (finish_interrupted: the inputs not finished are marked incomplete); one lock per run (lock_once); rank 0's
outcome shared with every torchrun rank (raise_shared)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..cache import (
    Index,
    Provenance,
    finish,
    list_parts,
    locked,
    read_index,
    remove_cache,
)
from ..cache.shards import shards_folder
from ..engines.torchrun import Dist
from ..errors import CacheBusy, CatdogError, InputError, Interrupted
from ..files import plural, printable
from ..sources.folder import Sample
from ..sources.tars import NO_IMAGE, UNREADABLE
from .config import ExtractReport, versions


def finish_run(cache: Path, prov: Provenance, report: ExtractReport, todo: list[Sample], drop: set[tuple[str, bytes]],
            strict: bool, had_cache: bool, data_dir: str | os.PathLike[str], finished: dict[str, bool],
            planned: Index | None = None, name: Callable[[str, bytes], str] = lambda source, p: os.fsdecode(p)
            ) -> int:
    """List the run's shards in the cache's index (or refuse under --strict); returns the cache's row count. `name`
    spells a part's failure record (source, path) as the report does, so --strict counts each failure once."""
    if strict:  # refuse to add them; the shards stay unlisted (they may hold an earlier run's saved work)
        failed = report.failed + [f for f in report.failed_before if f not in report.failed]
        seen = set(failed)
        for part in list_parts(cache):
            idx = read_index(part)
            for s, p, _, reason in idx.failed:
                record = (name(idx.sources[s], p), reason)
                if record not in seen:
                    seen.add(record)
                    failed.append(record)
        if failed:
            rel, reason = failed[0]
            raise InputError(f"--strict: {plural(len(failed), 'file')} could not be decoded, first {rel!r}: {reason}; "
                             "nothing was added to the cache")
    if not (todo or drop or list_parts(cache)):
        index = planned or read_index(cache)
        if not set(index.incomplete) & set(finished):
            return index.shape[0]
    index = finish(cache, prov, versions(), drop, incomplete=finished)  # writes the index only: O(shards)
    if index.shape[0] == 0 and not had_cache:
        remove_cache(cache)
        raise InputError(no_rows(data_dir, report.failed))
    return index.shape[0]


def finish_interrupted(cache: Path, prov: Provenance, partial: dict[str, bool], saved: str, dist: Dist | None = None,
                       settle: float = 5.0) -> Interrupted:
    """Ctrl-C, on every engine and source: list the cache shards on disk in the index and mark the inputs not
    finished incomplete (`partial`: source -> True; False clears an earlier mark), so `info` and `fit` describe the
    partial cache and the next run resumes (done units skipped, rows redone supersede the listed ones). Under torchrun
    rank 0 alone writes the index, as at the end of a run, after waiting up to `settle` seconds for the other ranks'
    parts in flight (their temp files; the index write would remove them). Returns the error to raise; `saved` says
    what was saved."""
    if dist is None or dist.main:
        folder = shards_folder(cache) if dist else None
        deadline = time.monotonic() + settle
        while folder is not None and any(folder.glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
        finish(cache, prov, versions(), incomplete=partial)
    return Interrupted(f"interrupted: {saved} saved to {cache}; run extract again to resume")


def unlisted_warning(cache: Path) -> list[str]:
    """Shards in the cache's shards folder that its index does not list are adopted by this run's finish: the saved
    work of a killed run, usually, but any same-provenance HDF5 file put there is adopted too, its rows and labels
    with it. Said, with their names, rather than adopted silently."""
    found = list_parts(cache, clean=False)
    if not found:
        return []
    more = f" and {len(found) - 3:,} more" if len(found) > 3 else ""
    names = ", ".join(printable(p.name) for p in found[:3]) + more
    return [f"{plural(len(found), 'shard')} in {printable(str(found[0].parent))} not listed in the index will be "
            f"adopted (a killed run's saved work, or files put there): {names}"]


def no_rows(data_dir: str | os.PathLike[str], failed: list[tuple[str, str]]) -> str:
    """Why an input gave no row: none of its images decoded, or (tar shards, empty or of other files) it has none."""
    if not failed or all(reason == NO_IMAGE for _, reason in failed):
        return f"no images in {printable(str(data_dir))}: it holds no .jpg/.jpeg/.png/.webp files" + (
            f" ({plural(len(failed), 'sample')} of other files, first {printable(failed[0][0])!r})" if failed else "")
    if all(reason.startswith(UNREADABLE) for _, reason in failed):
        return f"nothing could be read from {printable(str(data_dir))}; first failure: {printable(failed[0][0])}: " \
               f"{printable(failed[0][1])}"
    return f"no image in {data_dir} could be decoded; first failure: {failed[0][0]!r}: {failed[0][1]}"


def raise_shared(dist: Dist | None, error: CatdogError | None) -> None:
    """Rank 0's outcome reaches every rank (the cache's index exists, or all fail with one message), then raise."""
    if dist:
        message = dist.gather(str(error) if error else "")[0]
        if message and error is None:
            error = InputError(message)
    if error:
        raise error


@contextlib.contextmanager
def lock_once(cache: Path, dist: Dist | None) -> Iterator[None]:
    """One lock per run: held by rank 0 under torchrun. A refusal reaches every rank, so none waits forever."""
    if dist is None:
        with locked(cache):
            yield
        return
    error: CatdogError | None = None
    with contextlib.ExitStack() as stack:
        if dist.main:
            try:
                stack.enter_context(locked(cache))
            except CatdogError as e:
                error = e
        messages = dist.gather(str(error) if error else "")
        if messages[0]:
            raise error if error else CacheBusy(messages[0])
        yield

