"""An input's features in the head's caches: which cache (the head's training cache when it already holds the
input, else one beside the head named for the input and the features), extracted through extract when the read-only
plan says something is missing, never added to a training cache. A cache on object storage (`--cache s3://...`) is
read through its local copy and never added to either: scoring writes nothing to a store (its rows come from
`extract --cache URL`, whose staging, lease and upload order keep the store consistent)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ..cache import Provenance, open_cache, parts_dir, read_index
from ..engines.dispatch import extract
from ..errors import CacheBusy, CatdogError, InputError, ProvenanceMismatch
from ..extract.config import ExtractConfig, Progress
from ..extract.plan import pending
from ..extract.plan import up_to_date as nothing_to_read
from ..files import plausible_file, printable, same_file
from ..store.staging import read_copy
from ..store.url import BadCache, StoreURL, check_location
from .inputs import ScoreInput, score_input
from .scorer import Loaded


def default_cache(loaded: Loaded, head_path: Path, data_dir: str | os.PathLike[str] | ScoreInput, member: int = 0
                  ) -> Path:
    """Where an input's features go unless --cache says otherwise: the head's training cache when it already holds
    this input (the folder, or every shard) with the same provenance (preview on training images), else beside the
    head, named after the input and the feature provenance (heads of another backbone get their own file). A head
    moved elsewhere, with no such file beside it yet, reads the one of that name in its old place (the folder fit
    saved it in, or that of its training cache) when it holds the input unchanged (holds)."""
    inp = score_input(data_dir)
    prov = loaded.members[member][0] if loaded.members else loaded.provenance
    trained = loaded.meta.get("caches") or [loaded.meta.get("cache")]
    trained_on = trained[member] if isinstance(trained, list) and member < len(trained) else None
    # the path is recorded in the head, a file from outside: opened only if it is a plain cache-like file (never a
    # link, FIFO or /proc file that blocks or never ends)
    if isinstance(trained_on, str) and not os.path.islink(trained_on) and plausible_file(trained_on, MAX_CACHE_BYTES,
                                                                                          min_size=8):
        try:
            with open_cache(trained_on) as (_, index):
                if set(inp.sources) <= set(index.sources) and index.provenance == prov:
                    return Path(trained_on)
        except CatdogError:  # a damaged or busy training cache is not this command's business: use the default
            pass
    digest = hashlib.sha256(prov.to_json().encode()).hexdigest()[:8]
    beside = unlinked(head_path.parent / f"{inp.cache_name()}.{digest}.h5")
    if not beside.exists():
        # A moved head: the default cache of its old place (where fit saved it, else beside its training cache, where
        # fit puts a head by default) is read when it holds the input unchanged, instead of extracting it all again.
        for old in (loaded.meta.get("head"), trained_on):
            earlier = Path(old).parent / beside.name if isinstance(old, str) and old else None
            if earlier is not None and earlier != beside and holds(earlier, inp, prov):
                return earlier
    return beside


MAX_CACHE_BYTES = 1 << 50  # only to refuse nonsense: real caches stay far below


def holds(cache: Path, inp: ScoreInput, prov: Provenance) -> bool:
    """Whether a cache predict did not create here holds the whole input unchanged with these features
    (extract.plan.pending, read-only): a plain file reached through no link (its path came from the head, a file
    from outside), with no parts waiting. Anything else (missing, damaged, busy, stale) is simply not used."""
    if any(p.is_symlink() for p in (cache, cache.with_name(cache.name + ".lock"), parts_dir(cache))) or \
            not plausible_file(str(cache), MAX_CACHE_BYTES, min_size=8):
        return False
    try:
        return not pending(inp.spec, cache, prov, None, None if inp.tars else inp.discovery(), inp.shards)
    except (CatdogError, OSError):
        return False


def unlinked(cache: Path) -> Path:
    """A cache chosen by default is never reached through a symbolic link, nor are its lock and parts: a link
    planted in the head's folder would make predict create folders, an HDF5 file and a lock wherever it points.
    (An explicit --cache is the user's own choice and is followed, as extract follows it.)"""
    for p in (cache, cache.with_name(cache.name + ".lock"), parts_dir(cache), cache.with_name(cache.name + ".parts")):
        if p.is_symlink():
            raise InputError(f"{p} is a symbolic link; the default feature cache never follows one (remove it, or "
                             "give --cache PATH to use it on purpose)")
    return cache


CacheValue = str | os.PathLike[str] | StoreURL | BadCache


def scoring_caches(value: CacheValue | list[CacheValue] | None, data: str) -> tuple[list[Path], dict[Path, str]]:
    """predict's and preview's --cache values: local paths as given; a cache on object storage as its read-through
    local copy (store/staging.read_copy: downloaded or checked against the store now), with {local copy: URL} for
    cached_features (it only reads those) and for what the command says. `data`: the input, named in the refusal
    of a URL with no cache behind it."""
    values = [] if value is None or value == "" else \
        [value] if isinstance(value, str | os.PathLike | StoreURL | BadCache) else list(value)
    paths: list[Path] = []
    stores: dict[Path, str] = {}
    for v in values:
        loc = check_location(v)
        if isinstance(loc, StoreURL):
            local = read_copy(loc, _shell_arg(printable(data)))
            stores[local] = loc.url
            loc = local
        paths.append(loc)
    return paths, stores


def cached_features(loaded: Loaded, head_path: Path, data_dir: str | os.PathLike[str] | ScoreInput,
                    caches: list[Path] | None, device: str, batch_size: int, workers: int, progress: Progress | None,
                    stage: str, explicit: bool | None = None, stores: dict[Path, str] | None = None
                    ) -> tuple[list[Path], int]:
    """Make sure the input's features are cached for each backbone of the head (extracting only what is new or
    changed, through extract itself); returns the caches and how many images went through a backbone. A cache that
    already holds the whole input is only read: no lock, so heads on read-only media and concurrent predicts work.
    `stores`: caches that are local copies of a store's ({copy: URL}, scoring_caches): read when they hold the whole
    input unchanged, else refused (extract adds to a store cache)."""
    inp = score_input(data_dir)
    n = max(len(loaded.members), 1)
    if caches and len(caches) != n:
        raise InputError(f"--cache: the head needs {n} feature caches (one per backbone), got {len(caches)}")
    explicit = bool(caches) if explicit is None else explicit  # --cache given (not chosen by default_cache)
    caches = caches or [default_cache(loaded, head_path, inp, i) for i in range(n)]
    relabel = (lambda s, d, t: progress(stage if s == "extract" else s, d, t)) if progress else None
    extracted = 0
    trained = training_caches(loaded.meta)
    for i, cache in enumerate(caches):
        cfg = loaded.config(device, batch_size, workers, member=i)
        if explicit:
            _check_provenance(cache, cfg.provenance(), head_path, stage, (stores or {}).get(cache, ""))
        if stores and cache in stores:
            _check_in_store(cache, inp, stores[cache], stage, relabel, cfg.provenance())
            continue
        if any(same_file(cache, t) for t in trained):  # scoring reads a training cache, never adds to it
            _check_covered(cache, inp, head_path, explicit, relabel, cfg.provenance())
            continue
        if not up_to_date(inp, cache, cfg, relabel):
            classes = _tar_classes(cache, loaded) if inp.tars else None
            extracted += _extract_waiting(inp.spec, cache, cfg, relabel, classes)
    return caches, extracted


LOCK_WAIT = 600.0  # seconds predict waits for another extract of the same cache (CATDOG_LOCK_WAIT overrides)


def up_to_date(data_dir: str | os.PathLike[str] | ScoreInput, cache: Path, cfg: ExtractConfig,
               progress: Progress | None = None) -> bool:
    """Whether extract would have nothing to do for the input (extract.plan.up_to_date: its plan, read-only), with a
    folder's walk taken once per command (the ScoreInput's)."""
    cfg.check()
    inp = score_input(data_dir)
    return nothing_to_read(inp.spec, cache, cfg.provenance(), progress, None if inp.tars else inp.discovery(),
                           inp.shards)


def _tar_classes(cache: Path, loaded: Loaded) -> tuple[str, ...] | None:
    """What tar shards' `.cls` indexes mean when predict extracts them: the head's classes (0 cat, 1 dog for a cat/dog
    head), unless the cache already labels with classes of its own (extract keeps a cache's classes: None)."""
    try:
        index = read_index(cache) if cache.is_file() else None
    except CatdogError:
        return None  # extract reports what is wrong with it
    if index is not None and index.labeled and index.classes != list(loaded.classes):
        return None
    return tuple(loaded.classes)


def _extract_waiting(data_dir: str, cache: Path, cfg: ExtractConfig, progress: Progress | None,
                     classes: tuple[str, ...] | None = None) -> int:
    """extract(), waiting while another process holds the cache's lock (it may be extracting this very input, and
    then this run finds it cached): two predicts on one input both succeed."""
    try:
        wait = float(os.environ.get("CATDOG_LOCK_WAIT", LOCK_WAIT))
    except ValueError:
        raise InputError(f"CATDOG_LOCK_WAIT: expected seconds, got {os.environ['CATDOG_LOCK_WAIT']!r}") from None
    t0, pause = time.monotonic(), 0.1
    while True:
        try:
            return extract(data_dir, cache, cfg, progress=progress, classes=classes).extracted
        except CacheBusy as e:
            waited = time.monotonic() - t0
            if not waited < wait:
                raise CacheBusy(f"{e} (waited {waited:.0f} s; CATDOG_LOCK_WAIT=SECONDS waits longer)") from None
            if progress:
                progress("waiting", min(int(waited), int(wait)), int(wait))
            pause = min(2.0, pause * 2)  # each try plans the input again: not too often
            time.sleep(min(pause, max(wait - waited, 0.0)))


def training_caches(meta: dict) -> list[Path]:
    """The caches a head was trained on, as its meta records them (a file from outside: strings only)."""
    recorded = meta.get("caches") if isinstance(meta.get("caches"), list) else [meta.get("cache")]
    return [Path(c) for c in recorded if isinstance(c, str) and c]


def _check_provenance(cache: Path, want: Provenance, head_path: Path, stage: str, url: str = "") -> None:
    """A --cache of other features, worded for predict/preview (extract's own refusal speaks of extract flags);
    `url`: the store URL whose local copy `cache` is."""
    if not cache.exists() or cache.is_dir():
        return
    diffs = read_index(cache).provenance.differences(want, "the cache", "the head")
    if diffs:
        raise ProvenanceMismatch(f"--cache {printable(url) or cache} holds features made differently from the ones "
                                 f"head {head_path} was trained on ({'; '.join(diffs)}): give {stage} a cache of this "
                                 "head's features, or drop --cache (the features then go beside the head)")


def _missing(cache: Path, inp: ScoreInput, prov: Provenance, progress: Progress | None) -> str:
    """What a cache lacks of the input with these features (extract.plan.pending, read-only, on the cache's own
    index), said as a clause about "it"; "" when it holds the whole input unchanged."""
    left = pending(inp.spec, cache, prov, progress, None if inp.tars else inp.discovery(), inp.shards, parts=False)
    if not left:
        return ""
    data = printable(inp.spec)
    if left.other:
        return f"it cannot vouch for {data} ({left.other})"
    if inp.tars:
        return f"{left.new:,} of the {left.total:,} shards of {data} are not in it as they are now"
    if left.new:
        return f"{left.new:,} of the {left.total:,} images of {data} are not in it"
    return f"{left.changed:,} images of {data} changed since it was extracted"


def _shell_arg(data: str) -> str:
    return f"'{data}'" if any(c in data for c in "{ ") else data  # a brace pattern quoted for the shell


def _check_in_store(cache: Path, data_dir: str | os.PathLike[str] | ScoreInput, url: str, stage: str,
                    progress: Progress | None, prov: Provenance) -> None:
    """A store cache (read through its local copy `cache`) that holds the whole input unchanged with the head's
    features is scored from; anything else is refused: adding rows to a store takes a writer (extract's staging copy,
    its lease, its upload order), and scoring only reads."""
    inp = score_input(data_dir)
    what = _missing(cache, inp, prov, progress)
    if what:
        url = printable(url)
        raise InputError(f"--cache {url}: {what}; {stage} reads a cache on object storage but never adds to it: run "
                         f"`catdog-cache extract {_shell_arg(printable(inp.spec))} --cache {url}` first")


def _check_covered(cache: Path, data_dir: str | os.PathLike[str] | ScoreInput, head_path: Path, explicit: bool,
                   progress: Progress | None, prov: Provenance | None = None) -> None:
    """The head's training cache already holds the whole input, unchanged (extract.plan.pending, on the cache's own
    index): score from it. Anything it lacks is refused, not added: the next fit would train on it (held-out photos
    leaking into training)."""
    inp = score_input(data_dir)
    prov = prov if prov is not None else read_index(cache).provenance
    what = _missing(cache, inp, prov, progress)
    if not what:
        return
    data = printable(inp.spec)
    if explicit:
        raise InputError(f"--cache {cache} is the cache head {head_path} was trained on and {what}; scoring never "
                         "adds images to a training cache (the next fit would train on them): drop --cache (the "
                         "features then go beside the head); adding labeled inputs to a training cache is "
                         "`catdog-cache extract`'s job")
    arg = _shell_arg(data)
    raise InputError(f"{data} is in the training cache {cache} of head {head_path}, but {what}; scoring never adds "
                     f"to a training cache: run `catdog-cache extract {arg} --cache {cache}` first (the next fit "
                     "trains on them), or give --cache NEW.h5 to score the input apart")

