"""TODO"""

from __future__ import annotations

import contextlib
import os
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
from ..engines.torchrun import Dist
from ..errors import CacheBusy, CatdogError, InputError
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

