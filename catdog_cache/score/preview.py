"""Pictures from cached features: a grid of images with the head's prediction, or its N most confident mistakes
(fastai's "top losses"), each tile marked with its split (val / train / new). Takes every input extract takes: a
folder's tiles are read from its files, tar shards' from the shards themselves (each streamed once)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backbone import random_weights_note
from ..errors import InputError
from ..extract.config import Progress
from ..files import check_outputs, plural, printable, read_regular, same_file
from ..fit import split
from ..sources.decode import MAX_FILE_BYTES, DecodeError, decode_rgb
from ..sources.tars import picked_images
from .features import cached_features, scoring_caches
from .inputs import ScoreInput, folder_samples, score_input
from .rows import Scored, onto_head_classes, score_cached
from .scorer import load_scorer

SPLITS = ("val", "train", "all")


@dataclass
class PreviewReport:
    out: Path | None  # None: nothing to draw (--worst on a folder without mistakes)
    shown: int
    wrong: int | None  # None when the folder has no labels
    cache: list[Path] | None = None
    note: str = ""
    weights_note: str = ""  # backbone.random_weights_note of the head's features


def splits_of(meta: dict, cache: Path, scored) -> list[str]:
    """Each row's role in the head's training: val / train when this is its training cache, new otherwise."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    trained_on = meta.get("cache")
    if not (isinstance(trained_on, str) and same_file(Path(trained_on), cache)):
        return ["new"] * len(scored.rels)
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    if metrics.get("folds"):  # --folds: the saved head was trained on every labeled image
        return ["train" if y >= 0 else "new" for y in scored.labels]
    labels = np.array([-1] * len(scored.paths_all), np.int8)
    labels[scored.rows] = scored.labels
    try:  # the split is a hash of (seed, path): recomputed exactly, as fit drew it
        tr, va = split(scored.paths_all, labels, float(config.get("val_fraction", 0.2)), int(config.get("seed", 0)))
    except (TypeError, ValueError):
        return ["new"] * len(scored.rels)
    role = dict.fromkeys(va.tolist(), "val") | dict.fromkeys(tr.tolist(), "train")
    return [role.get(int(r), "new") for r in scored.rows]


def picture_bytes(inp: ScoreInput, scored: Scored, picks: list[int]) -> dict[int, bytes]:
    """The image bytes of the picked rows (a row that cannot be read now is left out): a folder's files; for tar
    input each shard holding a pick is streamed once (sources.tars.read_samples, as extract reads it) and only the
    picked samples' images are kept."""
    out: dict[int, bytes] = {}
    if not inp.tars:
        root = inp.discovery().root
        for i in picks:
            try:
                out[i] = read_regular(root / scored.keys[i], MAX_FILE_BYTES)
            except (OSError, ValueError):
                continue
        return out
    wanted: dict[str, dict[str, int]] = {}
    for i in picks:
        wanted.setdefault(scored.sources[i], {})[scored.keys[i]] = i
    return picked_images(wanted)  # each shard holding a pick streamed once


def grid_title(loaded, head_path: Path, what: str) -> str:
    """Which head and which backbones made these predictions (each backbone with its own weights: an ensemble's
    are not all the first one's), and which images these are (`what`, counted as shown)."""
    members = [p for p, _ in loaded.members] or [loaded.provenance]
    if len({p.weights for p in members}) == 1:
        on = f"{' + '.join(f'{p.arch} {p.layer}' for p in members)} features, weights {members[0].weights}"
    else:
        on = " + ".join(f"{p.arch} {p.layer} (weights {p.weights})" for p in members) + " features"
    head = loaded.head.describe() if loaded.head is not None else "head"
    return f"head {printable(head_path.name)}: {head}\non {printable(on)}; {what}"


def shown_what(shown: int, pool: int, scope: str, mistakes: int | None) -> str:
    """The grid's subject, counted from what it shows: `2 mistakes among 10 val images` when there were only two
    (never `the 4 most confident mistakes` over two tiles), `the 4 most confident of 7 mistakes ...` otherwise."""
    among = f"among {pool:,} {scope}images"
    if mistakes is None:
        return f"{shown:,} of {pool:,} {scope}images"
    if mistakes > shown:
        return f"the {shown:,} most confident of {mistakes:,} mistakes {among}"
    return f"{plural(shown, 'mistake')} {among}"


def preview(data_dir: str | os.PathLike[str], head_path: str | os.PathLike[str], out: str | os.PathLike[str],
            n: int = 16, weights_file: str | None = None, device: str = "auto", worst: int = 0, which: str = "val",
            cache: str | os.PathLike[str] | list | None = None, progress: Progress | None = None) -> PreviewReport:
    """A grid of n images spread over the chosen split, or (worst=N) the N most confident mistakes, with the
    predicted label and probability (true label and loss when known); wrong ones framed red. Images are shown as
    the model saw them (resize, center crop), without the normalisation."""
    from torchvision.transforms.v2 import functional as TF

    from ..backbone import Preset
    from ..plots import prediction_grid

    if n < 1 or worst < 0:
        raise InputError(f"--n must be at least 1 and --worst at least 0, got {n} and {worst}")
    if which not in SPLITS:
        raise InputError(f"--split: expected {', '.join(SPLITS)}, got {which!r}")
    head_path, out = Path(head_path), Path(out)
    caches, stores = scoring_caches(cache, os.fspath(data_dir))  # a store URL: its local copy, only read
    check_outputs({"--out": out}, {"--head": head_path, **{f"--cache {c}": c for c in caches}})
    inp = score_input(data_dir)
    data_dir = printable(inp.spec)
    disc = None if inp.tars else folder_samples(inp)
    loaded = load_scorer(head_path, weights_file, backbone=False)
    weights_note = random_weights_note([p.weights for p, _ in loaded.members] or [loaded.provenance.weights])
    if disc:
        onto_head_classes(disc, loaded.classes, head_path)
    used, _ = cached_features(loaded, head_path, inp, caches or None, device, 0, -1, progress, "preview",
                              stores=stores)
    scored = score_cached(loaded, used, inp, tta=False)
    if not scored.rels:
        first = f"; first failure: {scored.failed[0][0]!r}: {scored.failed[0][1]}" if scored.failed else ""
        raise InputError(f"no image of {data_dir} could be scored{first}")
    roles = splits_of(loaded.meta, used[0], scored)
    note = ""
    pool = [i for i, r in enumerate(roles) if which == "all" or r == which]
    if not pool:  # no image of the split: say so only for the head's training folder (any other folder is all new)
        training = any(r != "new" for r in roles)
        pool, note = list(range(len(roles))), f"no {which} images of the head's training here: showing all" \
            if training else ""
    pred = scored.probs.argmax(1)
    labels = np.array(scored.labels)
    p_true = np.where(labels >= 0, scored.probs[np.arange(len(labels)), np.clip(labels, 0, None)], np.nan)
    loss = -np.log(np.clip(p_true, 1e-15, 1))
    if worst:
        wrong = [i for i in pool if labels[i] >= 0 and pred[i] != labels[i]]
        if not [i for i in pool if labels[i] >= 0]:
            raise InputError(f"--worst needs labeled images; {data_dir} has none")
        picks = sorted(wrong, key=lambda i: -loss[i])[:worst]
        scope = f"{which} " if which != "all" and all(roles[i] == which for i in pool) else ""
        if not picks:  # good news, not an error
            return PreviewReport(None, 0, 0, used, f"no mistakes among {len(pool):,} {scope}images of "
                                 f"{data_dir}: nothing to show", weights_note)
        if len(picks) < worst:
            note = note or f"only {plural(len(picks), 'mistake')} among {len(pool):,} {scope}images"
    else:
        wrong = None
        scope = f"{which} " if which != "all" and all(roles[i] == which for i in pool) else ""
        picks = [pool[int(k)] for k in sorted({int(k) for k in np.linspace(0, len(pool) - 1, min(n, len(pool)))})]
    preset = Preset.from_spec(loaded.provenance.transform)
    images, captions, marks = [], [], []
    data = picture_bytes(inp, scored, picks)
    for i in picks:
        try:
            img = decode_rgb(data[i])
        except (KeyError, ValueError, DecodeError):
            continue
        images.append(TF.pil_to_tensor(TF.center_crop(TF.resize(img, preset.resize), preset.crop)))  # [3, S, S]
        names = loaded.classes  # a folder name: printable, and cut to keep the tile's caption on its tile
        text = f"{printable(names[pred[i]])[:20]} {scored.probs[i][pred[i]]:.2f}"
        if labels[i] >= 0:
            text += f" | true {printable(names[labels[i]])[:20]}, loss {loss[i]:.2f}"
        captions.append(f"{text}\n{printable(Path(scored.rels[i]).name)[:24]} [{roles[i]}]")
        marks.append(None if labels[i] < 0 else bool(pred[i] != labels[i]))
    if not images:
        raise InputError(f"none of the images picked from {data_dir} could be decoded")
    # decode failures shrink the grid: the title counts the tiles drawn (and, for --worst, every mistake there was)
    what = shown_what(len(images), len(pool), scope, None if wrong is None else len(wrong))
    path = prediction_grid(images, captions, marks, out, title=grid_title(loaded, head_path, what))
    known = [w for w in marks if w is not None]
    return PreviewReport(path, len(images), sum(known) if known else None, used, note, weights_note)
