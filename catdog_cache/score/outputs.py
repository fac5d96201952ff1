"""What predict writes: the predictions CSV (one probability column per class) and the Kaggle Redux submission."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..cache.format import CAT_DOG
from ..errors import InputError
from ..files import printable, write_atomic
from ..fit.head import is_cat_dog
from ..sources.folder import Discovery


def check_submission(classes: list[str], head_path: Path | str) -> None:
    if not is_cat_dog(classes):
        raise InputError(f"--submission writes the Kaggle Dogs vs. Cats Redux file (P(dog) per image id), and head "
                         f"{head_path} has the classes {', '.join(printable(c) for c in classes)[:300]}: drop "
                         "--submission (--out has every class's probability)")


def write_csv_atomic(path: Path, header: list[str], rows: list[tuple]) -> None:
    """Exclusive temp file + fsync + rename. surrogateescape: a non-UTF-8 file name is written back as its original
    bytes; every text cell, the header's too, goes through files.csv_cell (control characters escaped, a leading
    quote before what a spreadsheet would run as a formula)."""
    import csv

    from ..files import csv_cell

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")  # the csv module's default is \r\n
    w.writerow([csv_cell(c) for c in header])
    w.writerows([tuple(csv_cell(c) if isinstance(c, str) else c for c in row) for row in rows])
    write_atomic(path, buf.getvalue().encode("utf-8", errors="surrogateescape"))


def kaggle_id(rel: str) -> int | None:
    """A file's (or tar key's) Kaggle id: its base name's numeric stem (`test1/123.jpg`, key `123`: 123), else None."""
    stem = Path(rel).name.split(".")[0]
    return int(stem) if stem.isascii() and stem.isdigit() else None


def submission_ids(disc: Discovery) -> dict[int, str]:
    """Every image's Kaggle id, checked before any forward pass: numeric names only, each id once."""
    names = [s.rel for s in disc.samples] + [rel for rel, _ in disc.skipped if kaggle_id(rel) is not None]
    return key_ids([(rel, rel) for rel in names])


def key_ids(names: list[tuple[str, str]]) -> dict[int, str]:
    """(path or tar key, the name outputs show) -> {Kaggle id: shown name}: a numeric stem each (`123.jpg`, key `123`
    or `test1/123`), each id once. A failure record's empty key (a shard that could not be read) has no id."""
    ids: dict[int, str] = {}
    for key, shown in names:
        if not key:
            continue
        i = kaggle_id(key)
        if i is None:
            raise InputError(f"--submission needs numeric file names like 123.jpg (tar keys like 123 or test1/123); "
                             f"{shown!r} is not")
        if i in ids:
            raise InputError(f"--submission: {ids[i]!r} and {shown!r} have the same id {i}; keep one of them")
        ids[i] = shown
    return ids


def write_predictions(path: Path, rows: list[tuple], labels: list[int], classes: list[str] | None = None) -> None:
    """path, p_<class> for each class (p_cat, p_dog), label; for a labeled folder also true_label and the image's
    log loss (the summary's log loss is their mean): the images that cost the most are a sort away."""
    classes = classes or list(CAT_DOG)
    header = ["path", *(f"p_{c}" for c in classes), "label"]
    if not any(y >= 0 for y in labels):
        write_csv_atomic(path, header, rows)
        return
    extra = []
    for r, y in zip(rows, labels, strict=True):
        if y < 0:
            extra.append(("", ""))
            continue
        if len(classes) == 2:  # the clip of fit.log_loss on P(class 1), as computed before K classes
            p = float(np.clip(r[2] if y == 1 else 1.0 - r[2], 1e-15, 1 - 1e-15))
        else:  # fit.log_loss's multi-class clip and renormalisation, for one image
            q = np.clip(np.array(r[1:-1], dtype=np.float64), 1e-15, 1 - 1e-15)
            p = float(q[y] / q.sum())
        extra.append((classes[y], -float(np.log(p))))
    write_csv_atomic(path, [*header, "true_label", "log_loss"], [(*r, *e) for r, e in zip(rows, extra, strict=True)])


def write_submission(path: Path, p_dog: dict[int, float], clip: float = 0.0) -> None:
    """Kaggle Redux format: `id,label` with label = P(dog) clipped to [clip, 1 - clip] (chosen by `fit --calibrate`),
    one row per id, sorted by id."""
    write_csv_atomic(path, ["id", "label"], [(i, min(max(float(p), clip), 1 - clip))  # as computed: repr, no rounding
                                             for i, p in sorted(p_dog.items())])
