"""`catdog-cache audit` end to end on drawn images: planted near-copies of test images in the training folder
(JPEG quality 70 at 90% size, as the issue's check plants them) and an exact copy are reported, nothing else is; the
outputs (CSV, --json, contact sheets) agree; no file of the data set is touched; tar shards, caches of several
folders and K classes work; mistakes are one line."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from catdog_cache.backbone import WeightsSpec
from catdog_cache.demo import draw_animal
from catdog_cache.engines.dispatch import extract
from catdog_cache.extract.config import ExtractConfig
from tests.conftest import png_ok

TINY = ExtractConfig(weights=WeightsSpec("random", seed=0), backbone="tiny", workers=0, batch_size=32, device="cpu")
PLANTED = [("cat", 1000), ("dog", 1001)]  # test images copied, re-encoded, into train/
NEAR = "0.999"
PER_CLASS = 34  # 68 + 3 rows: more than one 64-row block
ROWS = 2 * PER_CLASS + 3  # tiny's random features put every drawn face close: re-encodes sit above 0.9999, others below


def paint(path: Path, kind: str, seed: int, size: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_animal(kind, random.Random(seed), size=size).save(path, quality=90)


def near_copy(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im.convert("RGB").resize((round(im.width * 0.9), round(im.height * 0.9)), Image.Resampling.BICUBIC).save(
            dst, quality=70)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: its content hash and mtime (audit must change neither, nor add or remove one)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """train/ (34 cats, 34 dogs, 2 near-copies of test images, 1 exact copy of a training image), test/ (3 + 3),
    their tiny caches."""
    root = tmp_path_factory.mktemp("planted")
    for kind in ("cat", "dog"):
        for i in range(PER_CLASS):
            paint(root / "train" / kind / f"{kind}.{i}.jpg", kind, 2 * i + (kind == "dog"))
        for i in range(1000, 1003):
            paint(root / "test" / kind / f"{kind}.{i}.jpg", kind, 2 * i + (kind == "dog"))
    for kind, i in PLANTED:
        near_copy(root / "test" / kind / f"{kind}.{i}.jpg", root / "train" / kind / f"planted.{kind}.{i}.jpg")
    shutil.copyfile(root / "train" / "cat" / "cat.5.jpg", root / "train" / "cat" / "copy.of.cat.5.jpg")
    extract(root / "train", root / "train.h5", TINY)
    extract(root / "test", root / "test.h5", TINY)
    return root


def audit_json(cli, *args) -> dict:
    return json.loads(cli("audit", *args, "--json", "--epochs", "3").output)


def test_planted_copies_and_the_exact_copy_are_reported_and_nothing_else(cli, planted):
    before = snapshot(planted / "train") | snapshot(planted / "test")
    out = planted / "out" / "audit.csv"
    d = audit_json(cli, "--cache", planted / "train.h5", "--against", planted / "test.h5", "--out", out,
                   "--near", NEAR)
    assert snapshot(planted / "train") | snapshot(planted / "test") == before  # nothing moved, deleted or changed
    pairs = {(Path(p["a"]).name, Path(p["b"]).name) for p in d["near_duplicates"]}
    assert pairs == {(f"planted.{k}.{i}.jpg", f"{k}.{i}.jpg") for k, i in PLANTED}
    assert all(p["against"] == str(planted / "test.h5") and p["cosine"] >= 0.999 for p in d["near_duplicates"])
    assert [(Path(p["a"]).name, Path(p["b"]).name, p["against"]) for p in d["exact_duplicates"]] == [
        ("cat.5.jpg", "copy.of.cat.5.jpg", None)]
    assert d["near_duplicates"][0]["a"] == str(planted / "train" / "cat" / "planted.cat.1000.jpg") or \
        d["near_duplicates"][0]["a"] == str(planted / "train" / "dog" / "planted.dog.1001.jpg")  # full paths
    cos = [p["cosine"] for p in d["near_duplicates"]]
    assert cos == sorted(cos, reverse=True)
    # the CSV holds the same findings, one line each, with the header the issue names
    with open(out, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["kind", "path", "other_path", "score", "given", "suggested"]
    kinds = [row[0] for row in lines[1:]]
    assert kinds.count("near_duplicate") == 2 and kinds.count("exact_duplicate") == 1
    assert kinds.count("label_issue") == len(d["label_issues"]) and kinds.count("outlier") == len(d["outliers"])
    near_rows = [row for row in lines[1:] if row[0] == "near_duplicate"]
    assert {(Path(r[1]).name, Path(r[2]).name) for r in near_rows} == pairs
    # a sheet per kind found, beside the CSV, pairs drawn side by side
    assert set(d["sheets"]) >= {"near_duplicates", "exact_duplicates"}
    for kind, path in d["sheets"].items():
        assert Path(path) == out.with_name(f"audit.{kind}.png")
        w, h = png_ok(Path(path))
        assert h >= 160 and (w >= 2 * 160 or kind not in ("near_duplicates", "exact_duplicates"))  # side by side


def test_the_summary_table_names_each_kind(cli, planted):
    r = cli("audit", "--cache", planted / "train.h5", "--against", planted / "test.h5", "--near", NEAR,
            "--no-sheets", "--epochs", "2", "--out", planted / "table.csv")
    for kind in ("label issues", "near duplicates", "exact duplicates", "outliers"):
        assert kind in r.output
    assert "planted.cat.1000.jpg" in r.output or "planted.dog.1001.jpg" in r.output
    assert f"audited {ROWS} rows" in r.output
    assert not list(planted.glob("table.*.png"))  # --no-sheets


def test_a_small_memory_budget_reads_blocks_and_finds_the_same(cli, planted):
    """3M holds neither the 71 x 4096-d features nor more than one 64-row block pair: the search reads blocks from
    the cache and the heads stream it; the findings are the same."""
    args = ["--cache", planted / "train.h5", "--against", planted / "test.h5", "--near", NEAR, "--no-sheets"]
    big = audit_json(cli, *args, "--out", planted / "big.csv")
    small = audit_json(cli, *args, "--out", planted / "small.csv", "--max-memory", "3M")
    for kind, score in (("label_issues", "p_given"), ("near_duplicates", "cosine"), ("exact_duplicates", "score"),
                        ("outliers", "score")):
        assert [{**x, score: 0} for x in small[kind]] == [{**x, score: 0} for x in big[kind]], kind
        assert [x[score] for x in small[kind]] == pytest.approx([x[score] for x in big[kind]], abs=1e-5)
    from catdog_cache.audit.neighbours import plan

    assert not plan(ROWS, 0, 4096, 10, 3 * 2**20, "near-duplicate").in_memory


def test_tar_shards_and_a_cache_of_two_inputs(cli, tmp_path, images):
    """Rows of tar shards are named shard#key; a cache appended from a folder holds two inputs (two shards of the
    cache): the same picture in both is an exact duplicate across them, named by each one's own way."""
    shard = tmp_path / "train-000.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in [*sorted(images.items()), ("extra.jpg", images["cat.0.jpg"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    folder = tmp_path / "more"
    for i in range(3):
        paint(folder / "cat" / f"more.{i}.jpg", "cat", 500 + i)
        paint(folder / "dog" / f"more.{i}.jpg", "dog", 600 + i)
    (folder / "dog" / "again.jpg").write_bytes(images["dog.1.jpg"])
    cache = tmp_path / "mixed.h5"
    extract(shard, cache, TINY)
    extract(folder, cache, TINY)
    d = audit_json(cli, "--cache", cache, "--near", "1.0", "--folds", "2", "--out", tmp_path / "a.csv")
    exact = {(p["a"], p["b"]) for p in d["exact_duplicates"]}
    assert exact == {(f"{shard}#cat.0", f"{shard}#extra"), (f"{shard}#dog.1", str(folder / "dog" / "again.jpg"))}
    assert d["rows"] == 16
    assert Path(d["sheets"]["exact_duplicates"]).is_file()  # tar pictures streamed from the shard


def test_any_k_classes(cli, tmp_path):
    root = tmp_path / "three"
    for c, name in enumerate(("ant", "bee", "cow")):
        for i in range(6):
            paint(root / name / f"{i}.jpg", ("cat", "dog")[c % 2], 10 * c + i)
    extract(root, tmp_path / "k.h5", TINY)
    d = audit_json(cli, "--cache", tmp_path / "k.h5", "--folds", "2", "--no-sheets", "--out", tmp_path / "k.csv")
    assert d["folds"] == 2 and d["rows"] == 18
    for li in d["label_issues"]:
        assert {li["given"], li["suggested"]} <= {"ant", "bee", "cow"} and li["given"] != li["suggested"]
        assert 0 <= li["p_given"] < li["p_suggested"] or li["confident"]


def test_mistakes_are_one_line(cli, planted, tmp_path):
    train, test = planted / "train.h5", planted / "test.h5"
    lite = tmp_path / "other.h5"
    extract(planted / "test", lite, ExtractConfig(weights=WeightsSpec("random", seed=1), backbone="tiny",
                                                  workers=0))
    cases = [
        (["--cache", train, "--against", lite], "disagree on how features are made"),
        (["--cache", train, "--against", train], "the same cache given twice"),
        (["--cache", train, "--out", train], "is the same file as --cache"),
        (["--cache", train, "--near", "1.5"], "--near is a cosine similarity"),
        (["--cache", train, "--max-memory", "lots"], "--max-memory: expected a size"),
        (["--cache", tmp_path / "missing.h5"], "missing.h5"),
        (["--cache", train, "--against", test, "--max-memory", "1M"], "--max-memory: the near-duplicate search"),
    ]
    for args, words in cases:
        r = cli("audit", *args, "--out" if "--out" not in args else "--quiet",
                *([tmp_path / "x.csv"] if "--out" not in args else []), ok=False)
        assert r.exit_code != 0, args
        assert words in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "x.csv").exists()


def test_an_unlabeled_cache_gets_duplicates_and_a_note(cli, tmp_path, test_dir):
    (test_dir / "again.jpg").write_bytes((test_dir / "1.jpg").read_bytes())
    extract(test_dir, tmp_path / "u.h5", TINY)
    d = audit_json(cli, "--cache", tmp_path / "u.h5", "--no-sheets", "--out", tmp_path / "u.csv")
    assert d["label_issues"] == [] and d["folds"] == 0 and "no labels" in d["notes"][0]
    assert [(Path(p["a"]).name, Path(p["b"]).name) for p in d["exact_duplicates"]] == [("1.jpg", "again.jpg")]
    assert d["exact_duplicates"][0]["a_label"] == ""
