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


def _walk(root: Path, skipped: list[tuple[str, str]]) -> dict[str, Stat]:
    """All regular files under root (relative POSIX path -> stat), skipping junk; symlinks to files are followed
    once, symlinked folders are not entered (no loops, no double counting)."""
    found: dict[tuple[int, int], tuple[str, bool]] = {}  # (dev, inode) -> (rel, via symlink): each file once
    stats: dict[tuple[int, int], Stat] = {}
    seen_dirs: set[tuple[int, int]] = set()

    def visit(folder: Path, rel: str) -> None:
        try:
            st = folder.stat()
            entries = list(os.scandir(folder))  # unsorted: a duplicate's kept name does not depend on order
        except OSError as e:
            skipped.append((rel or ".", f"unreadable folder: {e.strerror or e}"))
            return
        if (st.st_dev, st.st_ino) in seen_dirs:
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        for entry in entries:  # the hot loop of every rerun (one per file): DirEntry's cached type, one stat
            name = entry.name
            if name[0] == "." or name.lower() in JUNK_NAMES:
                continue
            sub = f"{rel}/{name}" if rel else name
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), sub))
                    continue
                link = entry.is_symlink()
                if link and Path(entry.path).is_dir():
                    skipped.append((sub, "symlinked folder not followed"))
                    continue
                st = os.stat(entry.path)  # follows a file symlink; a dangling one raises
            except OSError as e:
                skipped.append((sub, f"unreadable: {e.strerror or e}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append((sub, "not a regular file"))  # FIFOs, sockets, devices: never opened
                continue
            dot = name.rfind(".")  # os.path.splitext's suffix for a name without leading dots
            if dot > 0 and name[dot:].lower() in NOT_IMAGE_SUFFIXES:
                continue
            key = (st.st_dev, st.st_ino)
            if key in found:  # keep the real file over a symlink, then the first name in sorted order
                kept, kept_link = found[key]
                if (link, sub) < (kept_link, kept):
                    found[key] = (sub, link)
                    sub, kept = kept, sub
                skipped.append((sub, f"same file as {kept}"))
                continue
            found[key] = (sub, link)
            stats[key] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    pending: list[tuple[Path, str]] = [(root, "")]  # an explicit stack: any depth, no RecursionError
    while pending:
        visit(*pending.pop())
    return {rel: stats[key] for key, (rel, _) in found.items()}


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


def _nested_dataset(files: list[str], top: str) -> bool:
    """Whether class folder `top` is itself a labeled image folder (cat/ + dog/ inside it, or Kaggle cat.N / dog.N
    files): then the folder given is its parent, and its sub-folders would be taken for classes."""
    inner = [f.split("/", 1)[1] for f in files if f.split("/", 1)[0] == top and "/" in f]
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
    seen = _walk(root, skipped)
    files = sorted(seen)

    top_dirs = {f.split("/", 1)[0] for f in files if "/" in f}
    flat = [f for f in files if "/" not in f]
    samples: list[Sample] = []
    classes: tuple[str, ...] = ()
    if top_dirs and (not flat or any(d.lower() in CLASSES for d in top_dirs)):
        nested = sorted(d for d in top_dirs if _nested_dataset(files, d))
        if nested:
            raise InputError(f"{root} has sub-folders that are image folders themselves ({', '.join(nested[:5])}), "
                             "not classes: give one of them")
        layout = "imagefolder"
        classes = class_names(top_dirs)
        for f in files:
            if "/" not in f:
                skipped.append((f, "file beside the class folders: no class"))
            else:
                samples.append(Sample(f, classes.index(f.split("/", 1)[0].lower())))
        for i, cls in enumerate(classes):
            if not any(s.label == i for s in samples):
                warnings.append(f"class '{cls}' has no images")
    else:
        if top_dirs:
            warnings.append(f"sub-folders ignored ({', '.join(sorted(top_dirs)[:5])}): {root} has images at its top "
                            "level; put every image in a class folder to use the folders as classes")
        labels = [_kaggle_label(f) for f in flat]
        if any(lab != UNLABELED for lab in labels):
            layout = "kaggle"
            classes = CLASSES
            for f, lab in zip(flat, labels, strict=True):
                if lab == UNLABELED:
                    if _has_image_suffix(f):
                        skipped.append((f, "no 'cat.' or 'dog.' prefix in a Kaggle-style folder"))
                else:
                    samples.append(Sample(f, lab))
        else:
            layout = "unlabeled"
            samples = [Sample(f, UNLABELED) for f in flat]
    samples.sort(key=lambda s: s.rel)
    import numpy as np  # here, not at import: the CLI checks folders before loading anything heavy

    stat = np.array([seen[s.rel] for s in samples], dtype=np.int64).reshape(-1, 4)
    return Discovery(root, layout, samples, skipped, warnings, classes, stat)


def _kaggle_label(name: str) -> int:
    """Label from the exact prefix before the first dot: `cat.1.jpg` -> 0; `hotdog.2.jpg`, `cat_11.jpg` -> -1."""
    prefix, dot, _ = name.partition(".")
    if dot and prefix.lower() in CLASSES:
        return CLASSES.index(prefix.lower())
    return UNLABELED
