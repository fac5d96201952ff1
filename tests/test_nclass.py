"""Any labeled image folder: class folders define K classes, recorded in the cache and the head (issue 22)."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from catdog_cache.backbone import WeightsSpec
from catdog_cache.cache import assemble, compact, listed, read_features, read_index
from catdog_cache.engines.dispatch import extract
from catdog_cache.errors import CacheError, InputError
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.fit import FitConfig, fit
from catdog_cache.fit.head import load_head
from catdog_cache.score.predict import predict
from tests.conftest import draw

TINY = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0)


def three_classes(root: Path, n: int = 4, names: tuple[str, ...] = ("ant", "Bee", "cow")) -> Path:
    for c, name in enumerate(names):
        for i in range(n):
            draw(root / name / f"{i}.jpg", ("cat", "dog")[c % 2], 10 * c + i)
    return root


def test_cache_records_sorted_classes_and_refuses_a_new_one(tmp_path):
    extract(three_classes(tmp_path / "d"), tmp_path / "f.h5", TINY)
    idx = read_index(tmp_path / "f.h5")
    assert idx.classes == ["ant", "bee", "cow"]
    assert sorted(set(idx.labels.tolist())) == [0, 1, 2]
    with h5py.File(tmp_path / "f.h5") as f:
        assert json.loads(f.attrs["class_map"]) == {"ant": 0, "bee": 1, "cow": 2}
    # a folder of some of the classes keeps the cache's ids (cow is 2 there, 0 in its own folder)
    draw(tmp_path / "more" / "cow" / "9.jpg", "cat", 99)
    extract(tmp_path / "more", tmp_path / "f.h5", TINY)
    idx = read_index(tmp_path / "f.h5")
    assert idx.labels[[p == b"cow/9.jpg" for p in idx.paths]].tolist() == [2]
    # a new class is refused, naming it and the cache's classes, and the cache is unchanged
    draw(tmp_path / "new" / "deer" / "1.jpg", "dog", 5)
    with pytest.raises(InputError, match=r"classes the cache .* does not have \(deer\); its classes are ant, bee, cow"):
        extract(tmp_path / "new", tmp_path / "f.h5", TINY)
    assert read_index(tmp_path / "f.h5").shape[0] == 13


def test_unlabeled_then_labeled_cache_takes_the_folder_classes(tmp_path, test_dir):
    extract(test_dir, tmp_path / "f.h5", TINY)
    assert read_index(tmp_path / "f.h5").classes == []
    extract(three_classes(tmp_path / "d"), tmp_path / "f.h5", TINY)
    assert read_index(tmp_path / "f.h5").classes == ["ant", "bee", "cow"]


def test_classes_of_sharded_compacted_and_single_file_caches_agree(tmp_path, test_dir):
    """Each shard keeps its own class_map; the index records their merge, as assemble's single file does."""
    cache = tmp_path / "f.h5"
    extract(test_dir, cache, TINY)  # an unlabeled shard first: it names no class
    extract(three_classes(tmp_path / "d"), cache, TINY)
    draw(tmp_path / "more" / "cow" / "9.jpg", "cat", 99)
    extract(tmp_path / "more", cache, TINY)  # a shard of one class, mapped onto the cache's ids
    assert listed(cache)[0] == 2 and len(listed(cache)[1].names) == 3
    sharded = read_index(cache)
    assert sharded.classes == ["ant", "bee", "cow"] and sharded.labeled
    with h5py.File(cache) as f:
        assert json.loads(f.attrs["class_map"]) == {"ant": 0, "bee": 1, "cow": 2}
    assert sharded.labels[[p == b"cow/9.jpg" for p in sharded.paths]].tolist() == [2]
    # the same parts assembled into one schema-1 file: the same classes, labels and features
    folder = tmp_path / "one"
    folder.mkdir()
    for name in listed(cache)[1].names:
        shutil.copy(cache.with_name("f.h5.shards") / name, folder / name)
    single = tmp_path / "single.h5"
    folder.rename(single.with_name("single.h5.parts"))
    one = assemble(single, sharded.provenance, {}, dim=sharded.shape[2])
    compact(cache, {})
    for other in (one, read_index(cache)):
        assert other.classes == sharded.classes and other.labels.tolist() == sharded.labels.tolist()
        assert other.paths == sharded.paths
    np.testing.assert_array_equal(read_features(single), read_features(cache))
    compact(cache, {}, single=True)
    assert listed(cache)[0] == 1 and read_index(cache).classes == ["ant", "bee", "cow"]
    # an unlabeled cache has no classes in any layout
    extract(test_dir, tmp_path / "u.h5", TINY)
    assert read_index(tmp_path / "u.h5").classes == [] and not read_index(tmp_path / "u.h5").labeled


@pytest.mark.parametrize("class_map", ['{"a": 0, "b": 2}', '{"a": true, "b": 1}', '[1, 2]', '{"": 0}',
                                       json.dumps({f"c{i}": i for i in range(128)}), json.dumps({"x" * 256: 0})])
def test_crafted_class_map_refused(tmp_path, kaggle_dir, class_map):
    extract(kaggle_dir, tmp_path / "f.h5", TINY)
    with h5py.File(tmp_path / "f.h5", "a") as f:
        f.attrs["class_map"] = class_map
    with pytest.raises(CacheError, match="damaged"):
        read_index(tmp_path / "f.h5")


def test_labels_beyond_the_classes_refused(tmp_path, kaggle_dir):
    extract(kaggle_dir, tmp_path / "f.h5", TINY)
    with h5py.File(tmp_path / "f.h5", "a") as f:  # a sharded cache's index: its class_map is its shards' merge
        f.attrs["class_map"] = '{"cat": 0}'
    with pytest.raises(CacheError, match="records the classes 'cat', its shards label with 'cat, dog'"):
        read_index(tmp_path / "f.h5")
    extract(kaggle_dir, tmp_path / "g.h5", TINY)
    compact(tmp_path / "g.h5", {}, single=True)  # a single file (the layout of every shard)
    with h5py.File(tmp_path / "g.h5", "a") as f:
        f.attrs["class_map"] = '{"cat": 0}'
    with pytest.raises(CacheError, match="labels outside -1 .* its 1 classes"):
        read_index(tmp_path / "g.h5")


def test_fit_predict_k_classes(tmp_path):
    extract(three_classes(tmp_path / "d", n=6), tmp_path / "f.h5", TINY)
    r = fit(tmp_path / "f.h5", tmp_path / "h.pt", FitConfig(epochs=3, val_fraction=0.5), folds=3, calibrate_head=True)
    assert r.classes == ["ant", "bee", "cow"] and r.head_shape.endswith("Linear(4096, 3)")
    assert np.array(r.confusion).shape == (3, 3) and np.array(r.confusion).sum() == 18
    assert r.calibration["clip"] == 0.0 and r.reliability is not None and r.reliability.is_file()
    assert r.confusion_plot == tmp_path / "h.confusion.png" and r.confusion_plot.is_file()
    head, meta = load_head(tmp_path / "h.pt")
    assert meta["classes"] == ["ant", "bee", "cow"] and head.linear.weight.shape == (3, 4096)

    out = predict(tmp_path / "d", tmp_path / "h.pt", tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "p_ant", "p_bee", "p_cow", "label", "true_label", "log_loss"]
    assert {r[5] for r in rows[1:]} == {"ant", "bee", "cow"}
    assert all(abs(sum(map(float, r[1:4])) - 1) < 1e-5 and r[4] in ("ant", "bee", "cow") for r in rows[1:])
    assert out.log_loss == pytest.approx(np.mean([float(r[6]) for r in rows[1:]]), rel=1e-6)

    # a folder of one of the classes is scored with the head's ids; an unknown class or a submission are refused
    draw(tmp_path / "cows" / "cow" / "1.jpg", "cat", 1)
    assert predict(tmp_path / "cows", tmp_path / "h.pt", tmp_path / "c.csv").labels == [2]
    draw(tmp_path / "deer" / "deer" / "1.jpg", "cat", 1)
    with pytest.raises(InputError, match=r"not trained on \(deer\)"):
        predict(tmp_path / "deer", tmp_path / "h.pt", tmp_path / "x.csv")
    with pytest.raises(InputError, match="--submission writes the Kaggle Dogs vs. Cats Redux file"):
        predict(tmp_path / "d", tmp_path / "h.pt", tmp_path / "x.csv", submission=tmp_path / "s.csv")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "s.csv").exists()


def test_head_with_crafted_classes_refused(tmp_path, kaggle_dir):
    import torch

    extract(kaggle_dir, tmp_path / "f.h5", TINY)
    fit(tmp_path / "f.h5", tmp_path / "h.pt", FitConfig(epochs=1), curve=False)
    assert load_head(tmp_path / "h.pt")[1]["classes"] == ["cat", "dog"]
    blob = torch.load(tmp_path / "h.pt", weights_only=True)
    for bad in (["cat", "cat"], ["cat"], ["cat", 1], ["a", "b", "c"]):
        torch.save({**blob, "classes": bad}, tmp_path / "bad.pt")
        with pytest.raises(CacheError):
            load_head(tmp_path / "bad.pt")


# --- the real multi-class test: digits drawn with Pillow's own font, EfficientNet-Lite0 features, a linear head ---

def render_digit(digit: int, rng: random.Random, size: int = 96) -> Image.Image:
    """A digit in Pillow's built-in font (Aileron, with FreeType) at a random size, angle, offset and colours."""
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    fg = tuple((c + rng.randint(100, 155)) % 256 for c in bg)  # far from the background in every channel
    font = ImageFont.load_default(size=rng.randint(size * 2 // 5, size * 3 // 4))
    glyph = Image.new("L", (size, size), 0)
    ImageDraw.Draw(glyph).text((size / 2, size / 2), str(digit), fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR,
                         translate=(rng.randint(-size // 6, size // 6), rng.randint(-size // 6, size // 6)))
    return Image.composite(Image.new("RGB", (size, size), fg), Image.new("RGB", (size, size), bg), glyph)


def digit_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = random.Random(seed)
    for d in range(10):
        (root / str(d)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render_digit(d, rng).save(root / str(d) / f"{i}.png")
    return root


# Measured (2026-12-01, this 2-core VM, Pillow 13.0, torch 2.14.1): 16 training digits per class, 6 held out, the
# linear head for 200 epochs (160 images are 2 batches an epoch: the default 20 epochs are 40 Adam steps and leave it
# underfit, 0.82-0.92 and log loss 1.1): held-out accuracy 0.950 / 0.967 / 0.950 and log loss 0.233 / 0.208 / 0.269
# for the seed pairs (1, 2), (3, 4), (5, 6). The bounds leave room for another Pillow's font rendering.
DIGITS_MIN_ACC, DIGITS_MAX_LOG_LOSS = 0.88, 0.5


def test_digits_linear_head_on_efficientnet_lite0(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the [lite] extra is not installed")
    if not isinstance(ImageFont.load_default(size=20), ImageFont.FreeTypeFont):
        pytest.skip("this Pillow has no FreeType: its bitmap font cannot be scaled")
    lite = ExtractConfig(weights=WeightsSpec("imagenet"), backbone="efficientnet_lite0", workers=0)
    extract(digit_folder(tmp_path / "train", 16, seed=1), tmp_path / "f.h5", lite)
    r = fit(tmp_path / "f.h5", tmp_path / "h.pt", FitConfig(val_fraction=0.0, epochs=200), curve=False)
    assert r.head_shape == "Dropout(0.5) -> Linear(1280, 10)"
    out = predict(digit_folder(tmp_path / "test", 6, seed=2), tmp_path / "h.pt", tmp_path / "p.csv")
    assert len(out.rows) == 60 and out.classes == [str(d) for d in range(10)]
    assert out.accuracy >= DIGITS_MIN_ACC and out.log_loss <= DIGITS_MAX_LOG_LOSS, (out.accuracy, out.log_loss)


def test_cli_k_classes(cli, tmp_path):
    from tests.conftest import TINY as TINY_FLAGS

    data = three_classes(tmp_path / "d", n=5)
    cli("extract", data, *TINY_FLAGS)
    info = json.loads(cli("info", "--json").output)
    assert info["classes"] == {"ant": 5, "bee": 5, "cow": 5} and "cat" not in info
    r = cli("fit", "--epochs", "2", "--val-fraction", "0.4", "--calibrate")
    assert "true \\ predicted" in r.output and "cow" in r.output and "Linear(4096, 3)" in r.output
    assert "(clip)" not in r.output  # the P(dog) clip is for cat/dog heads
    fitted = json.loads(cli("fit", "--epochs", "2", "--val-fraction", "0.4", "--json").output)
    assert fitted["classes"] == ["ant", "bee", "cow"] and len(fitted["confusion"]) == 3
    assert set(fitted["per_class_acc"]) == {"ant", "bee", "cow"}
    r = cli("predict", data, "--submission", "sub.csv", ok=False)
    assert r.exit_code == 1 and "Traceback" not in r.output and "drop --submission" in r.output
    cli("predict", data, "--out", "p.csv")
    assert Path("p.csv").read_text().splitlines()[0] == "path,p_ant,p_bee,p_cow,label,true_label,log_loss"


def test_export_k_classes(cli, tmp_path):
    from tests.conftest import TINY as TINY_FLAGS

    data = three_classes(tmp_path / "d", n=3)
    cli("extract", data, *TINY_FLAGS)
    cli("fit", "--epochs", "1", "--val-fraction", "0")
    cli("export", "--out", "m.pt2")
    cli("predict", data, "--model", "m.pt2", "--out", "p.csv")
    rows = Path("p.csv").read_text().splitlines()
    assert rows[0] == "path,p_ant,p_bee,p_cow,label,true_label,log_loss" and len(rows) == 10


def test_pictures_show_dollar_names_as_written(tmp_path):
    """Class and file names are folder names: a `$` must not start matplotlib's mathtext (a parse error)."""
    import torch

    from catdog_cache.plots import confusion_matrix, prediction_grid

    names = ["$\\frac{a$", "$x^$"]
    assert confusion_matrix([[1, 2], [3, 4]], names, tmp_path / "c.png").is_file()
    assert prediction_grid([torch.zeros(3, 8, 8, dtype=torch.uint8)], [names[0]], [None], tmp_path / "g.png",
                           title=names[1]).is_file()
