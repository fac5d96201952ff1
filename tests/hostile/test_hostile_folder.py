"""A hostile folder, generated here: every class of bad input at once, through the CLI."""

import io
import os

import numpy as np
from PIL import Image

from catdog_cache.cache import read_index
from tests.conftest import TINY, draw


def png(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_hostile_folder(cli, tmp_path):
    root = tmp_path / "hostile"
    good = [draw(root / "cat" / f"{i}.jpg", "cat", i) for i in range(3)] + \
        [draw(root / "dog" / f"{i}.jpg", "dog", 10 + i) for i in range(3)]
    cat, dog = root / "cat", root / "dog"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("I am not a JPEG")
    (cat / "trunc.jpg").write_bytes(good[0].read_bytes()[:400])
    (dog / "png-named.jpg").write_bytes(png(Image.new("RGB", (50, 40), (1, 2, 3))))
    Image.new("RGB", (40, 40), (0, 128, 255)).convert("CMYK").save(dog / "cmyk.jpg")
    (dog / "rgba.png").write_bytes(png(Image.new("RGBA", (30, 30), (255, 0, 0, 128))))
    (dog / "sixteen.png").write_bytes(png(Image.fromarray(np.full((20, 20), 40000, np.uint16))))
    (cat / "strip.png").write_bytes(png(Image.new("L", (6000, 20))))
    (cat / ".hidden.jpg").write_bytes(good[0].read_bytes())
    (cat / "Thumbs.db").write_bytes(b"junk")
    os.mkfifo(cat / "fifo.jpg")
    os.symlink(root, cat / "loop")
    (root / "bird").mkdir()
    draw(root / "bird" / "1.jpg", "cat", 99)
    (root / "weird \n ünï" ).mkdir()

    r = cli("extract", root, *TINY)
    assert r.exit_code == 0
    idx = read_index("cache/features.h5")
    rows = {p.decode(): lab for p, lab in zip(idx.paths, idx.labels.tolist(), strict=True)}
    assert idx.classes == ["bird", "cat", "dog"]  # every class folder is a class (issue 22), sorted
    assert rows == {**{f"cat/{i}.jpg": 1 for i in range(3)}, **{f"dog/{i}.jpg": 2 for i in range(3)},
                    "dog/png-named.jpg": 2, "dog/cmyk.jpg": 2, "dog/rgba.png": 2, "dog/sixteen.png": 2,
                    "bird/1.jpg": 0}
    failed = {p.decode(): reason for _, p, _, reason in idx.failed}
    assert set(failed) == {"cat/zero.jpg", "cat/text.jpg", "cat/trunc.jpg", "cat/strip.png"}
    assert "empty" in failed["cat/zero.jpg"] and "aspect" in failed["cat/strip.png"]
    out = r.output
    assert "not a regular file" in out and "4 files could not be decoded" in out
    # one console line per bad file at most, never a traceback
    assert "Traceback" not in out and out.count("trunc.jpg") == 1


def test_garbage_cache_is_one_line(cli, kaggle_dir, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "features.h5").write_bytes(b"garbage" * 100)
    for args in (["extract", kaggle_dir, *TINY], ["fit"], ["info"]):
        r = cli(*args, ok=False)
        assert r.exit_code == 1 and "not a readable HDF5 cache" in r.output and "Traceback" not in r.output
    assert (tmp_path / "cache" / "features.h5").read_bytes() == b"garbage" * 100  # never overwritten silently


def test_oversized_file_refused_before_reading(cli, kaggle_dir, monkeypatch):
    import importlib

    for mod in ("catdog_cache.extract.rerun", "catdog_cache.extract.loader"):  # the rehash and the loader workers' read
        monkeypatch.setattr(importlib.import_module(mod), "MAX_FILE_BYTES", 1000)  # every drawn JPEG is larger
    (kaggle_dir / "cat.90.jpg").write_bytes(b"\xff" * 500)  # small enough to be read (and rejected as not an image)
    r = cli("extract", kaggle_dir, *TINY, ok=False)
    assert r.exit_code == 1 and "file limit" in r.output  # nothing usable: a clear refusal, no cache


def test_unwritable_cache_location_is_one_line(cli, kaggle_dir, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder is expected")
    r = cli("extract", kaggle_dir, *TINY, "--cache", tmp_path / "blocker" / "c.h5", ok=False)
    assert r.exit_code == 1 and "blocker" in r.output and "Traceback" not in r.output
