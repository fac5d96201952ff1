"""Folder -> sorted list of samples (relative path, label). ImageFolder, Kaggle-flat and unlabeled layouts."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import numpy as np

CLASSES: tuple[str, ...] = ("cat", "dog")  # the Kaggle classes: cat=0, dog=1 (Kaggle names, and cat/ + dog/ folders)
UNLABELED = -1
MAX_CLASSES = 127  # labels are stored as int8 (-1 unlabeled): 127 classes fit, and no image folder we know needs more
MAX_CLASS_NAME = 255  # bytes of a folder name on the common file systems: a longer recorded name is crafted
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
    root: Path
    layout: str  # "imagefolder" | "kaggle" | "unlabeled"
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason)
    warnings: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = ()  # label i means classes[i]; () for an unlabeled folder
    # [len(samples), 4] int64: each sample's (size, mtime_ns, inode, device) as the walk saw it, links followed. A
    # rerun compares it with what the cache recorded (rerun.py): the walk's stat is the only one taken per file.
    stat: np.ndarray | None = None

    def keep(self, rels: set[str]) -> None:
        """Restrict the samples (and their stats) to these relative paths."""
        import numpy as np

        mask = [s.rel in rels for s in self.samples]
        self.samples = [s for s, m in zip(self.samples, mask, strict=True) if m]
        if self.stat is not None:
            self.stat = self.stat[np.array(mask, dtype=bool).reshape(-1)]

    def subfolder_hint(self) -> str:
        """For "no images found": a parent of the image folders was probably given."""
        try:
            subs = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not _is_junk(e.name))
        except OSError:
            return ""
        return f"; it has sub-folders ({', '.join(subs[:5])}): give one of them" if subs else ""


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


Stat = tuple[int, int, int, int]  # (size, mtime_ns, inode, device)


def _walk(root: Path, skipped: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    """All regular files under root (relative POSIX paths, in walk order, and their stats [N, 4]), skipping junk;
    symlinks to files are followed once, symlinked folders are not entered (no loops, no double counting). The hot
    loop of every rerun: plain lists per file, the same-file check on the stat array afterwards (_dedup)."""
    import numpy as np  # here, not at import: the CLI checks folders before loading anything heavy

    rels: list[str] = []
    links: list[bool] = []
    stats: list[Stat] = []
    skips: list[tuple[int, str, str]] = []  # (files found before it, rel, reason): its place in walk order
    seen_dirs: set[tuple[int, int]] = set()
    junk, not_image, isreg, stat_of = JUNK_NAMES, NOT_IMAGE_SUFFIXES, stat.S_ISREG, os.stat

    def visit(folder: Path, rel: str) -> None:
        try:
            st = folder.stat()
            entries = list(os.scandir(folder))  # unsorted: a duplicate's kept name does not depend on order
        except OSError as e:
            skips.append((len(rels), rel or ".", f"unreadable folder: {e.strerror or e}"))
            return
        if (st.st_dev, st.st_ino) in seen_dirs:
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        prefix = f"{rel}/" if rel else ""
        for entry in entries:  # one per file: DirEntry's cached type, one stat, three appends
            name = entry.name
            if name[0] == "." or name.lower() in junk:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), prefix + name))
                    continue
                link = entry.is_symlink()
                if link and Path(entry.path).is_dir():
                    skips.append((len(rels), prefix + name, "symlinked folder not followed"))
                    continue
                st = stat_of(entry.path)  # follows a file symlink; a dangling one raises
            except OSError as e:
                skips.append((len(rels), prefix + name, f"unreadable: {e.strerror or e}"))
                continue
            if not isreg(st.st_mode):
                skips.append((len(rels), prefix + name, "not a regular file"))  # FIFOs, sockets, devices: never opened
                continue
            dot = name.rfind(".")  # os.path.splitext's suffix for a name without leading dots
            if dot > 0 and name[dot:].lower() in not_image:
                continue
            rels.append(prefix + name)
            links.append(link)
            stats.append((st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))

    pending: list[tuple[Path, str]] = [(root, "")]  # an explicit stack: any depth, no RecursionError
    while pending:
        visit(*pending.pop())
    arr = np.array(stats, dtype=np.int64).reshape(-1, 4)  # [N, 4]
    keep = _dedup(rels, links, arr, skips)
    skipped += [(rel, why) for _, rel, why in skips]
    if keep is None:
        return rels, arr
    return [rels[i] for i in keep], arr[keep]


def _dedup(rels: list[str], links: list[bool], stat: np.ndarray, skips: list[tuple[int, str, str]]
           ) -> list[int] | None:
    """Indices of the files to keep when some are one file under several names (same device and inode), else None
    (the usual case, checked on the array). Keeps the real file over a symlink, then the first name in sorted
    order; each other name is a skip, placed in `skips` where the walk met it."""
    import numpy as np

    order = np.lexsort((stat[:, 2], stat[:, 3]))  # by (device, inode)
    srt = stat[order]
    if not ((srt[1:, 2] == srt[:-1, 2]) & (srt[1:, 3] == srt[:-1, 3])).any():
        return None
    found: dict[tuple[int, int], int] = {}  # (dev, inode) -> index of the name kept so far
    dups: list[tuple[int, str, str]] = []  # as skips; met while taking file i: after the walk's skips before it
    for i, (rel, link, st) in enumerate(zip(rels, links, stat.tolist(), strict=True)):
        key = (st[3], st[2])
        k = found.get(key)
        if k is None:
            found[key] = i
            continue
        loser, winner = (k, i) if (link, rel) < (links[k], rels[k]) else (i, k)
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
    if set(names) <= set(CLASSES):
        return CLASSES
    if len(names) > MAX_CLASSES:
        raise InputError(f"{len(names)} class folders: the cache stores labels as int8, at most {MAX_CLASSES} "
                         "classes; split the classes over several caches (or group them into fewer folders)")
    return names


def _nested_dataset(inner: list[str]) -> bool:
    """Whether a class folder is itself a labeled image folder (cat/ + dog/ inside it, or Kaggle cat.N / dog.N
    files), given the paths inside it: then the folder given is its parent, and its sub-folders would be taken for
    classes."""
    sub = {f.split("/", 1)[0].lower() for f in inner if "/" in f}
    flat = {_kaggle_label(f) for f in inner if "/" not in f}
    return set(CLASSES) <= sub or {0, 1} <= flat


def discover(root: str | os.PathLike[str]) -> Discovery:
    """Sorted samples of a folder. Labels come from class sub-folders (one per class, any number of them: the
    ImageFolder layout) or from the exact Kaggle prefix (`cat.123.jpg`); a folder with neither is unlabeled.
    Sub-folders define classes when they hold the images: a folder whose images lie at its top level is read as
    before classes were folders (Kaggle-flat or unlabeled) and its sub-folders are ignored, unless one is named cat
    or dog. Content is sniffed later, at decode time."""
    root = folder(root)
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    rels, walked = _walk(root, skipped)
    order = sorted(range(len(rels)), key=rels.__getitem__)
    files = [rels[i] for i in order]
    heads = [f.partition("/") for f in files]  # (top folder, "/", rest) or (name, "", "")

    top_dirs = {h[0] for h in heads if h[1]}
    flat = [f for f, h in zip(files, heads, strict=True) if not h[1]]
    picked: list[int] = []  # indices into files of the samples, in order (files are sorted: so are the samples)
    labels: list[int] = []
    classes: tuple[str, ...] = ()
    if top_dirs and (not flat or any(d.lower() in CLASSES for d in top_dirs)):
        inner: dict[str, list[str]] = {d: [] for d in top_dirs}
        for top, sep, rest in heads:
            if sep:
                inner[top].append(rest)
        nested = sorted(d for d in top_dirs if _nested_dataset(inner[d]))
        if nested:
            raise InputError(f"{root} has sub-folders that are image folders themselves ({', '.join(nested[:5])}), "
                             "not classes: give one of them")
        layout = "imagefolder"
        classes = class_names(top_dirs)
        label_of = {d: classes.index(d.lower()) for d in top_dirs}
        for n, (f, (top, sep, _)) in enumerate(zip(files, heads, strict=True)):
            if not sep:
                skipped.append((f, "file beside the class folders: no class"))
            else:
                picked.append(n)
                labels.append(label_of[top])
        have = set(labels)
        warnings += [f"class '{cls}' has no images" for i, cls in enumerate(classes) if i not in have]
    else:
        if top_dirs:
            warnings.append(f"sub-folders ignored ({', '.join(sorted(top_dirs)[:5])}): {root} has images at its top "
                            "level; put every image in a class folder to use the folders as classes")
        flat_at = [n for n, h in enumerate(heads) if not h[1]]
        flat_labels = [_kaggle_label(f) for f in flat]
        if any(lab != UNLABELED for lab in flat_labels):
            layout = "kaggle"
            classes = CLASSES
            for n, f, lab in zip(flat_at, flat, flat_labels, strict=True):
                if lab == UNLABELED:
                    if _has_image_suffix(f):
                        skipped.append((f, "no 'cat.' or 'dog.' prefix in a Kaggle-style folder"))
                else:
                    picked.append(n)
                    labels.append(lab)
        else:
            layout = "unlabeled"
            picked, labels = flat_at, [UNLABELED] * len(flat)
    samples = list(map(Sample, [files[n] for n in picked], labels))
    import numpy as np

    stat = walked[np.array(order, dtype=np.int64)[np.array(picked, dtype=np.int64)]].reshape(-1, 4)  # [N, 4]
    return Discovery(root, layout, samples, skipped, warnings, classes, stat)


def _kaggle_label(name: str) -> int:
    """Label from the exact prefix before the first dot: `cat.1.jpg` -> 0; `hotdog.2.jpg`, `cat_11.jpg` -> -1."""
    prefix, dot, _ = name.partition(".")
    if dot and prefix.lower() in CLASSES:
        return CLASSES.index(prefix.lower())
    return UNLABELED
