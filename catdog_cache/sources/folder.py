"""Folder -> sorted list of samples (relative path, label). ImageFolder, Kaggle-flat and unlabeled layouts."""

from __future__ import annotations

import bisect
import operator
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..cache.format import CAT_DOG, MAX_CLASSES, STAT_WIDTH
from ..errors import InputError
from ..files import printable

if TYPE_CHECKING:
    import numpy as np

KAGGLE_PREFIX = {"cat.": 0, "dog.": 1}  # a Kaggle name's label from its exact prefix up to the first dot, lowercased
UNLABELED = -1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin"}
# Suffixes that are certainly not photos; anything else (including no suffix) is sniffed by the decoder.
NOT_IMAGE_SUFFIXES = {".txt", ".csv", ".json", ".md", ".py", ".xml", ".html", ".htm", ".pdf", ".zip", ".gz", ".tar",
                      ".mp4", ".mov", ".avi", ".mp3", ".wav", ".h5", ".pt", ".pth", ".npy", ".db", ".ini", ".log"}


@dataclass(frozen=True)
class Sample:
    rel: str  # POSIX relative path; may hold any character the file system allows (surrogate-escaped bytes)
    label: int  # index into Discovery.classes (0 cat, 1 dog for cat/dog folders), -1 unlabeled


@dataclass
class Discovery:
    """A folder's samples as columns: sorted relative paths, their labels and stats. The rerun of a large unchanged
    folder needs no per-file object beyond the walk's own list of paths: `samples` (Sample objects, for the callers
    that iterate them) is built on first use. Change the files or labels through `samples`, `relabel` or `keep`,
    which keep that list in step."""

    root: Path
    layout: str  # "imagefolder" | "kaggle" | "unlabeled"
    rels: list[str]  # POSIX relative paths, sorted; any character the file system allows (surrogate-escaped bytes)
    labels: np.ndarray  # [len(rels)] int64: index into classes (0 cat, 1 dog for cat/dog folders), -1 unlabeled
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason)
    warnings: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = ()  # label i means classes[i]; () for an unlabeled folder
    # [len(rels), 5] int64: each sample's (size, mtime_ns, inode, device, ctime_ns) as the walk saw it, links
    # followed (cache.format.STAT_FIELDS). A
    # rerun compares it with what the cache recorded (rerun.py): the walk's stat is the only one taken per file.
    stat: np.ndarray | None = None
    _samples: list[Sample] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, root: Path, layout: str, samples: list[Sample], stat: np.ndarray | None = None) -> Discovery:
        """From Sample objects (e.g. one input shard's)."""
        import numpy as np

        return cls(root, layout, [s.rel for s in samples], np.array([s.label for s in samples], np.int64), stat=stat)

    @property
    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._samples = list(map(Sample, self.rels, self.labels.tolist()))
        return self._samples

    @samples.setter
    def samples(self, samples: list[Sample]) -> None:
        import numpy as np

        self.rels = [s.rel for s in samples]
        self.labels = np.array([s.label for s in samples], np.int64).reshape(-1)  # [N]
        self._samples = list(samples)

    def relabel(self, labels: np.ndarray) -> None:
        """New labels [len(rels)] for the same files (e.g. onto a cache's class ids)."""
        self.labels = labels
        self._samples = None

    def pick(self, at: list[int]) -> list[Sample]:
        """The samples at these indices, without building the others."""
        labels = self.labels[at].tolist() if len(at) else []
        return list(map(Sample, [self.rels[i] for i in at], labels))

    def keep(self, rels: set[str]) -> None:
        """Restrict the samples (and their stats) to these relative paths."""
        import numpy as np

        mask = np.array([r in rels for r in self.rels], dtype=bool).reshape(-1)  # [N]
        self.rels = [r for r, m in zip(self.rels, mask.tolist(), strict=True) if m]
        self.labels = self.labels[mask]
        self._samples = None
        if self.stat is not None:
            self.stat = self.stat[mask]

    def subfolder_hint(self) -> str:
        """For "no images found": a parent of the image folders was probably given."""
        try:
            subs = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not _is_junk(e.name))
        except OSError:
            return ""
        return f"; it has sub-folders ({', '.join(subs[:5])}): give one of them" if subs else ""


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


Stat = tuple[int, int, int, int, int]  # (size, mtime_ns, inode, device, ctime_ns): cache.format.STAT_FIELDS


def _walk(root: Path, skipped: list[tuple[str, str]]) -> tuple[list[str], np.ndarray, int]:
    """All regular files under root (relative POSIX paths, in walk order, and their stats [N, 5]), skipping junk,
    and how many of them lie at root's top level (the first ones: root is visited first); symlinks to files are
    followed once, symlinked folders are not entered (no loops, no double counting). The hot loop of every rerun:
    each folder is opened once and its files are stat'ed by name relative to it (a folder renamed mid-walk cannot
    redirect the stats), one stat per file that also tells a file from anything else (no per-file type checks),
    plain lists per file, the same-file check on the stat array afterwards (_dedup)."""
    import numpy as np  # here, not at import: the CLI checks folders before loading anything heavy

    rels: list[str] = []
    stats: list[int] = []  # (size, mtime_ns, inode, device, ctime_ns) of each file in turn, flat: [5 N]
    skips: list[tuple[int, str, str]] = []  # (files found before it, rel, reason): its place in walk order
    seen_dirs: set[tuple[int, int]] = set()
    junk, not_image, isreg, isdir, stat_of = JUNK_NAMES, NOT_IMAGE_SUFFIXES, stat.S_ISREG, stat.S_ISDIR, os.stat
    usual = (".jpg", ".jpeg", ".png")  # in IMAGE_SUFFIXES, so never in not_image
    fields = operator.attrgetter("st_size", "st_mtime_ns", "st_ino", "st_dev", "st_ctime_ns")  # one C call per file
    add_stat = stats.extend

    def visit(folder: str, rel: str) -> None:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            skips.append((len(rels), rel or ".", f"unreadable folder: {e.strerror or e}"))
            return
        try:
            try:
                st = os.fstat(fd)
                entries = list(os.scandir(fd))  # unsorted: a duplicate's kept name does not depend on order
            except OSError as e:
                skips.append((len(rels), rel or ".", f"unreadable folder: {e.strerror or e}"))
                return
            if (st.st_dev, st.st_ino) in seen_dirs:
                return
            seen_dirs.add((st.st_dev, st.st_ino))
            prefix = f"{rel}/" if rel else ""
            for entry in entries:  # one per file: one stat (links followed), two appends; others leave early
                name = entry.name
                if name[0] == "." or name.lower() in junk:
                    continue
                try:
                    st = stat_of(name, dir_fd=fd)  # follows a symlink; a dangling one raises
                except OSError as e:
                    other(entry, folder, prefix, e)
                    continue
                if not isreg(st.st_mode):
                    other(entry, folder, prefix, st)
                    continue
                if not name.endswith(usual):  # else the suffix is an image's: one C call for most photos
                    dot = name.rfind(".")  # os.path.splitext's suffix for a name without leading dots
                    if dot > 0 and name[dot:].lower() in not_image:
                        continue
                rels.append(prefix + name)
                add_stat(fields(st))
        finally:
            os.close(fd)

    def other(entry: os.DirEntry[str], folder: str, prefix: str, st: os.stat_result | OSError) -> None:
        """An entry that is not a regular file (or a link to one): a folder to enter, else a skip."""
        rel = prefix + entry.name
        try:
            real_dir = entry.is_dir(follow_symlinks=False)  # scandir's type: no stat
        except OSError:
            real_dir = False
        if real_dir:  # entered (an unreadable one is a skip of its own there)
            pending.append((os.path.join(folder, entry.name), rel))
        elif isinstance(st, OSError):
            skips.append((len(rels), rel, f"unreadable: {st.strerror or st}"))
        elif isdir(st.st_mode):
            skips.append((len(rels), rel, "symlinked folder not followed"))
        else:
            skips.append((len(rels), rel, "not a regular file"))  # FIFOs, sockets, devices: never opened

    pending: list[tuple[str, str]] = []  # an explicit stack: any depth, no RecursionError
    visit(str(root), "")
    top = len(rels)
    while pending:
        visit(*pending.pop())
    arr = np.array(stats, dtype=np.int64).reshape(-1, STAT_WIDTH)  # [N, 5]
    keep = _dedup(root, rels, arr, skips)
    skipped += [(rel, why) for _, rel, why in skips]
    if keep is None:
        return rels, arr, top
    return [rels[i] for i in keep], arr[keep], bisect.bisect_left(keep, top)


def _dedup(root: Path, rels: list[str], stat: np.ndarray, skips: list[tuple[int, str, str]]) -> list[int] | None:
    """Indices of the files to keep when some are one file under several names (same device and inode), else None
    (the usual case, checked on the array). Keeps the real file over a symlink, then the first name in sorted
    order; each other name is a skip, placed in `skips` where the walk met it."""
    import numpy as np

    def link(i: int) -> bool:  # asked only of a file met under several names: the walk keeps no flag per file
        return os.path.islink(os.path.join(root, rels[i]))

    inodes = np.sort(stat[:, 2])  # [N]; distinct inodes (the usual case) settle it with one sort
    if not (inodes[1:] == inodes[:-1]).any():
        return None
    srt = stat[np.lexsort((stat[:, 2], stat[:, 3]))]  # by (device, inode)
    if not ((srt[1:, 2] == srt[:-1, 2]) & (srt[1:, 3] == srt[:-1, 3])).any():
        return None
    found: dict[tuple[int, int], int] = {}  # (dev, inode) -> index of the name kept so far
    dups: list[tuple[int, str, str]] = []  # as skips; met while taking file i: after the walk's skips before it
    for i, (rel, st) in enumerate(zip(rels, stat.tolist(), strict=True)):
        key = (st[3], st[2])
        k = found.get(key)
        if k is None:
            found[key] = i
            continue
        loser, winner = (k, i) if (link(i), rel) < (link(k), rels[k]) else (i, k)
        found[key] = winner
        dups.append((i, rels[loser], f"same file as {rels[winner]}"))
    merged = sorted([(p, 0, n, rel, why) for n, (p, rel, why) in enumerate(skips)] +
                    [(p, 1, n, rel, why) for n, (p, rel, why) in enumerate(dups)])
    skips[:] = [(p, rel, why) for p, _, _, rel, why in merged]
    return sorted(found.values())


def _has_image_suffix(rel: str) -> bool:
    return os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES


def folder(root: str | os.PathLike[str]) -> Path:
    """The image folder, if it is one (also checked by the CLI before it imports torch)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"not a folder: {root}")
    return root


def class_names(folders: set[str]) -> tuple[str, ...]:
    """Class folders -> class names, index = class id. Names are the folder names in lower case, sorted (as
    torchvision's ImageFolder sorts them, less its case sensitivity: `Cat/` and `cat/` are one class, as they are on
    case-insensitive file systems, and a cache appended from both spellings keeps one class). Folders named only
    cat and dog are the Kaggle classes cat=0, dog=1 whether one or both are present, as before N classes existed:
    a folder of dog/ alone appended to a cat/dog cache keeps dog=1."""
    names = tuple(sorted({d.lower() for d in folders}))
    if set(names) <= set(CAT_DOG):
        return CAT_DOG
    if len(names) > MAX_CLASSES:
        raise InputError(f"{len(names)} class folders: the cache stores labels as int8, at most {MAX_CLASSES} "
                         "classes; split the classes over several caches (or group them into fewer folders)")
    return names


SPLITS = ("train", "training", "val", "valid", "validation", "test", "testing")  # the folders of a split data set


def _nested_dataset(top: str, paths: list[str]) -> bool:
    """Whether class folder `top` is itself a labeled image folder (cat/ + dog/ inside it, or Kaggle cat.N / dog.N
    files), given the paths in it, each "top/...": then the folder given is its parent, and its sub-folders would
    be taken for classes. A folder named cat or dog is a class whatever its files are called: a photo moved into its
    right class folder keeps its Kaggle name (ImageFolder's rule; prefixes label flat folders only). The paths are
    joined and lowercased once and searched in C, not looked at one by one."""
    blob = "\0" + "\0".join(paths).lower() + "\0"  # NUL: in no file name
    head = "\0" + top.lower() + "/"
    if all(head + c + "/" in blob for c in CAT_DOG):
        return True
    return top.lower() not in CAT_DOG and all(_has_file(blob, head + c + ".") for c in CAT_DOG)


def _split_folders(runs: dict[str, tuple[int, int]], paths: list[str]) -> dict[str, set[str]]:
    """The sub-folders that are the splits of a data set rather than classes (the PyTorch tutorial's train/ + val/,
    each holding the same class folders), with the folders inside each; {} when the sub-folders are classes. Only a
    layout with no image directly inside any sub-folder is looked at further (the common one is decided in C)."""
    if all(top.lower() in CAT_DOG for top in runs):
        return {}  # cat/ and dog/ are classes, whatever is inside them
    blob = "\0" + "\0".join(paths).lower() + "\0"
    if any(_has_file(blob, "\0" + top.lower() + "/") for top in runs):
        return {}
    inside = {top: {p.split("/")[1] for p in paths[a:b]} for top, (a, b) in runs.items()}
    shared = set.intersection(*(set(map(str.lower, d)) for d in inside.values())) if len(inside) > 1 else set()
    if len(shared) > 1 or any(top.lower() in SPLITS for top in runs):  # one shared name may be a year, a camera
        return inside
    return {}


def _has_file(blob: str, start: str) -> bool:
    """Whether a NUL-separated path in `blob` begins with `start` and has no "/" after it (a file, not a folder)."""
    i = blob.find(start)
    while i >= 0:
        end = blob.index("\0", i + 1)
        if blob.find("/", i + len(start), end) < 0:
            return True
        i = blob.find(start, end)
    return False


def discover(root: str | os.PathLike[str]) -> Discovery:
    """Sorted samples of a folder. Labels come from class sub-folders (one per class, any number of them: the
    ImageFolder layout) or from the exact Kaggle prefix (`cat.123.jpg`); a folder with neither is unlabeled.
    Sub-folders define classes when they hold the images: a folder whose images lie at its top level is read as
    before classes were folders (Kaggle-flat or unlabeled) and its sub-folders are ignored, unless one is named cat
    or dog. Content is sniffed later, at decode time."""
    import numpy as np

    root = folder(root)
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    rels, walked, top = _walk(root, skipped)  # rels[:top] at the top level, the others in sub-folders
    # The two groups never mix (one is the samples, the other skipped or ignored): each is sorted on its own.
    flat_at = sorted(range(top), key=rels.__getitem__)
    flat = list(map(rels.__getitem__, flat_at))
    inner_at = sorted(range(top, len(rels)), key=rels.__getitem__)
    inner = list(map(rels.__getitem__, inner_at))
    runs = _runs(inner)
    classes: tuple[str, ...] = ()
    if runs and (not flat or any(d.lower() in CAT_DOG for d in runs)):
        nested = sorted(d for d, (a, b) in runs.items() if _nested_dataset(d, inner[a:b]))
        if nested:
            raise InputError(f"{root} has sub-folders that are image folders themselves ({', '.join(nested[:5])}), "
                             "not classes: give one of them")
        splits = _split_folders(runs, inner)
        if splits:
            shown = "; ".join(f"{printable(d)}/ holds {', '.join(printable(c) for c in sorted(splits[d])[:4])}"
                              for d in sorted(splits)[:3])
            train = next((d for d in sorted(splits) if d.lower() in ("train", "training")), sorted(splits)[0])
            raise InputError(f"{root} is a split data set, not class folders ({shown}): extract the training "
                             f"folder ({printable(str(root / train))}), then validate on the others with fit --val "
                             "(or score them with predict)")
        layout = "imagefolder"
        classes = class_names(set(runs))
        skipped += [(f, "file beside the class folders: no class") for f in flat]
        labels = np.empty(len(inner), np.int64)  # [N]
        for d, (a, b) in runs.items():
            labels[a:b] = classes.index(d.lower())
        have = {classes.index(d.lower()) for d in runs}
        warnings += [f"class '{cls}' has no images" for i, cls in enumerate(classes) if i not in have]
        stat = walked[np.array(inner_at, np.int64)].reshape(-1, STAT_WIDTH)  # [N, 5]
        return Discovery(root, layout, inner, labels, skipped, warnings, classes, stat)
    if runs:
        warnings.append(f"sub-folders ignored ({', '.join(sorted(runs)[:5])}): {root} has images at its top "
                        "level; put every image in a class folder to use the folders as classes")
    labels = _kaggle_labels(flat)  # [N]
    stat = walked[np.array(flat_at, np.int64)].reshape(-1, STAT_WIDTH)  # [N, 5]
    if not (labels != UNLABELED).any():
        return Discovery(root, "unlabeled", flat, labels, skipped, warnings, classes, stat)
    keep = labels != UNLABELED  # [N]
    if not keep.all():
        skipped += [(f, "no 'cat.' or 'dog.' prefix in a Kaggle-style folder")
                    for f, k in zip(flat, keep.tolist(), strict=True) if not k and _has_image_suffix(f)]
        flat, labels, stat = [f for f, k in zip(flat, keep.tolist(), strict=True) if k], labels[keep], stat[keep]
    return Discovery(root, "kaggle", flat, labels, skipped, warnings, CAT_DOG, stat)


def _kaggle_labels(names: list[str]) -> np.ndarray:
    """Sorted file names -> their labels by _kaggle_label's rule, [N] int64. The names starting exactly `cat.` (or
    `dog.`) are contiguous in sorted order: one bisect each labels them; only the others are looked at one by one."""
    import numpy as np

    labels = np.full(len(names), UNLABELED, np.int64)  # [N]
    rest = []  # [start, end) of the names outside the exact-prefix runs
    start = 0
    for prefix, label in sorted(KAGGLE_PREFIX.items()):
        a = bisect.bisect_left(names, prefix, start)
        b = bisect.bisect_left(names, prefix[:-1] + "/", a)  # "/" follows ".": past every "cat." name
        labels[a:b] = label
        rest.append((start, a))
        start = b
    rest.append((start, len(names)))
    for a, b in rest:  # other cases (CAT.1.jpg), other prefixes: the general rule
        labels[a:b] = [KAGGLE_PREFIX.get(f[:f.find(".") + 1].lower(), UNLABELED) for f in names[a:b]]
    return labels


def _runs(paths: list[str]) -> dict[str, tuple[int, int]]:
    """Sorted paths, each below a top folder -> each top folder's [start, end) in them. A folder's files share the
    prefix "top/", so they are contiguous in sorted order: one bisect per folder, not a look at every file."""
    runs: dict[str, tuple[int, int]] = {}
    i = 0
    while i < len(paths):
        top = paths[i][:paths[i].index("/")]
        end = bisect.bisect_left(paths, top + "0", i)  # "0" follows "/": the first path past every "top/..."
        runs[top], i = (i, end), end
    return runs


def _kaggle_label(name: str) -> int:
    """Label from the exact prefix before the first dot: `cat.1.jpg` -> 0; `hotdog.2.jpg`, `cat_11.jpg` -> -1."""
    prefix, dot, _ = name.partition(".")
    if dot and prefix.lower() in CAT_DOG:
        return CAT_DOG.index(prefix.lower())
    return UNLABELED
