"""Scoring takes every input extract takes (tar shards as well as folders), through extract's one planner."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from catdog_cache.backbone import WeightsSpec
from catdog_cache.extract.config import ExtractConfig
from catdog_cache.extract.plan import pending
from catdog_cache.files import same_file
from tests.conftest import TINY, jpeg
from tests.extract.test_tars import make_tar

CFG = ExtractConfig(WeightsSpec("random"), backbone="tiny", workers=0, batch_size=4, device="cpu")
PATTERN = "shards/x-{000000..000001}.tar"


def rows(path: str | Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def head(cli, kaggle_dir) -> Path:
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "2")
    return Path("cache/features.head.pt")


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, bytes]:
    """Kaggle test photos: numeric names, no labels, 3 per shard."""
    return {f"{i}.jpg": jpeg("cat" if i % 2 else "dog", 500 + i, tmp_path / "drawn") for i in range(1, 7)}


def as_files_and_shards(tmp_path: Path, photos: dict[str, bytes]) -> Path:
    """The same photos as a folder test1/ and as two shards keyed test1/N (ids from the keys' numeric stems)."""
    folder = tmp_path / "test1"
    folder.mkdir()
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    names = sorted(photos, key=lambda n: int(n.split(".")[0]))
    for s in range(2):
        make_tar(tmp_path / "shards" / f"x-{s:06d}.tar", [(f"test1/{n}", photos[n]) for n in names[3 * s:3 * s + 3]])
    return folder


def test_predict_on_tar_shards_equals_predict_on_the_files(cli, head, tmp_path, photos, monkeypatch):
    folder = as_files_and_shards(tmp_path, photos)
    files = json.loads(cli("predict", folder, "--out", "files.csv", "--submission", "files-sub.csv", "--json").output)
    tars = json.loads(cli("predict", PATTERN, "--out", "tars.csv", "--submission", "tars-sub.csv", "--json").output)
    assert files["extracted"] == tars["extracted"] == 6 and files["cache"] != tars["cache"]
    assert Path(tars["cache"][0]).name.startswith("x.")  # named after the pattern, beside the head
    a, b = rows("files.csv"), rows("tars.csv")
    assert a[0] == b[0] == ["path", "p_cat", "p_dog", "label"]
    assert [r[0] for r in b[1:]] == [f"x-00000{(i - 1) // 3}.tar#test1/{i}" for i in range(1, 7)]  # SHARD#KEY
    by_id = {int(r[0].split(".")[0]): r for r in a[1:]}
    for r in b[1:]:
        f = by_id[int(r[0].rpartition("/")[2])]
        np.testing.assert_allclose([float(x) for x in r[1:3]], [float(x) for x in f[1:3]], atol=1e-6)
        assert r[3] == f[3]
    sub_a, sub_b = rows("files-sub.csv"), rows("tars-sub.csv")
    assert [r[0] for r in sub_b] == ["id", *map(str, range(1, 7))]  # ids from the keys' numeric stems
    np.testing.assert_allclose([float(r[1]) for r in sub_b[1:]], [float(r[1]) for r in sub_a[1:]], atol=1e-6)
    from catdog_cache.backbones import tiny

    monkeypatch.setattr(tiny, "make", lambda spec: (_ for _ in ()).throw(AssertionError("the backbone ran")))
    again = json.loads(cli("predict", PATTERN, "--out", "again.csv", "--json").output)
    assert again["extracted"] == 0 and again["cache"] == tars["cache"] and rows("again.csv") == b
    listing = tmp_path / "shards.txt"
    listing.write_text("shards/x-000000.tar\nshards/x-000001.tar\n")
    by_listing = json.loads(cli("predict", listing, "--out", "listed.csv", "--json", "--cache", tars["cache"][0])
                            .output)
    assert by_listing["extracted"] == 0 and rows("listed.csv") == b  # a listing of the same shards: the same rows


def test_labels_from_cls_members_give_the_folders_accuracy_and_log_loss(cli, head, tmp_path, kaggle_dir):
    members = []
    for i, p in enumerate(sorted(kaggle_dir.iterdir())):
        members += [(f"img/{i:03d}.jpg", p.read_bytes()), (f"img/{i:03d}.cls", b"1" if p.name[:3] == "dog" else b"0")]
    make_tar(tmp_path / "labeled" / "l-000000.tar", members[:12])
    make_tar(tmp_path / "labeled" / "l-000001.tar", members[12:])
    files = json.loads(cli("predict", kaggle_dir, "--out", "files.csv", "--json").output)
    tars = json.loads(cli("predict", "labeled/l-{000000..000001}.tar", "--out", "tars.csv", "--json").output)
    assert tars["rows"] == files["rows"] == 12 and tars["accuracy"] == files["accuracy"]
    assert tars["log_loss"] == pytest.approx(files["log_loss"], abs=1e-6)
    b = rows("tars.csv")
    assert b[0][-2:] == ["true_label", "log_loss"] and {r[-2] for r in b[1:]} == {"cat", "dog"}


def test_submission_ids_from_tar_keys_are_checked(cli, head, tmp_path, images):
    make_tar(tmp_path / "k.tar", sorted(images.items()))  # keys cat.0 ...: no numeric id
    r = cli("predict", tmp_path / "k.tar", "--submission", "s.csv", ok=False)
    assert r.exit_code == 1 and "numeric file names" in r.output and "k.tar#cat.0" in r.output
    assert not Path("s.csv").exists()
    data = images["cat.0.jpg"]
    make_tar(tmp_path / "d" / "a.tar", [("1.jpg", data)])
    make_tar(tmp_path / "d" / "b.tar", [("01.jpg", data)])
    r = cli("predict", str(tmp_path / "d" / "{a,b}.tar"), "--submission", "s.csv", ok=False)
    assert r.exit_code == 1 and "same id 1" in r.output and "a.tar#1" in r.output and "b.tar#01" in r.output


@pytest.mark.parametrize("given", ["shards/none-{000000..000001}.tar", "missing.tar"])
def test_missing_tar_input_is_one_line(cli, head, given):
    r = cli("predict", given, ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and "not found" in r.output


def test_read_only_plan_per_shard(cli, head, tmp_path, photos):
    as_files_and_shards(tmp_path, photos)
    first = json.loads(cli("predict", PATTERN, "--json").output)
    cache = Path(first["cache"][0])
    prov = CFG.provenance()
    shards = [str(tmp_path / "shards" / f"x-{s:06d}.tar") for s in range(2)]
    assert not pending(PATTERN, cache, prov, shards=shards)  # the same rule extract's plan uses: nothing to read
    make_tar(tmp_path / "shards" / "x-000001.tar", [("test1/4.jpg", photos["4.jpg"])])  # changed: one sample now
    left = pending(PATTERN, cache, prov)
    assert (left.new, left.total) == (1, 2)
    again = json.loads(cli("predict", PATTERN, "--json").output)
    assert again["extracted"] == 1 and again["rows"] == 4, again  # only the changed shard read; its dropped keys gone


def test_a_heads_training_shards_are_scored_from_its_cache_never_added_to(cli, tmp_path, photos, images):
    make_tar(tmp_path / "t" / "t-000000.tar", sorted(images.items())[:4])
    make_tar(tmp_path / "t" / "t-000001.tar", sorted(images.items())[4:])
    cli("extract", "t/t-{000000..000001}.tar", *TINY)
    cli("fit", "--epochs", "1")
    r = json.loads(cli("predict", "t/t-{000000..000001}.tar", "--json").output)
    assert r["extracted"] == 0 and r["accuracy"] is not None
    assert [Path(c).resolve() for c in r["cache"]] == [Path("cache/features.h5").resolve()]  # its training cache
    make_tar(tmp_path / "t" / "t-000002.tar", sorted(images.items())[:2])
    r = cli("predict", "t/t-{000000..000002}.tar", "--cache", "cache/features.h5", ok=False)
    assert r.exit_code == 1 and "1 of the 3 shards" in r.output and "never" in r.output


def test_preview_reads_tiles_from_the_shards(cli, head, tmp_path, photos):
    as_files_and_shards(tmp_path, photos)
    r = cli("preview", PATTERN, "--n", "4", "--out", "grid.png")
    assert "preview 4 images" in r.output and Path("grid.png").stat().st_size > 1000


def test_verify_takes_labeled_shards(cli, tmp_path, images):
    from catdog_cache.fit import FitConfig
    from catdog_cache.verify import verify

    make_tar(tmp_path / "v" / "v-000000.tar", sorted(images.items())[:4])  # cat.N / dog.N keys: labeled by prefix
    dogs = [data for _, data in sorted(images.items())[4:]]
    make_tar(tmp_path / "v" / "v-000001.tar", [m for i, data in enumerate(dogs)
                                               for m in ((f"s/{i}.jpg", data), (f"s/{i}.cls", b"1"))])  # .cls labels
    r = verify("v/v-{000000..000001}.tar", CFG, FitConfig(epochs=2, batch_size=4), limit=6)
    assert r.identity_expected and r.agree and r.n_images == 6 and r.max_streamed_diff == 0
    out = cli("verify", "v/v-{000000..000001}.tar", *TINY, "--epochs", "2", "--batch-size", "4").output
    assert "agree within" in out and "8 images" in out


def test_exported_model_on_shards_equals_it_on_the_files(cli, head, tmp_path, photos):
    folder = as_files_and_shards(tmp_path, photos)
    cli("export", "--out", "m.pt2")
    cli("predict", folder, "--model", "m.pt2", "--out", "files.csv", "--submission", "files-sub.csv")
    cli("predict", PATTERN, "--model", "m.pt2", "--out", "tars.csv", "--submission", "tars-sub.csv")
    cli("predict", PATTERN, "--out", "head.csv")
    a, b, h = rows("files.csv"), rows("tars.csv"), rows("head.csv")
    assert [r[0] for r in b] == [r[0] for r in h]  # the cache route's order and names
    np.testing.assert_allclose([float(r[2]) for r in b[1:]], [float(r[2]) for r in h[1:]], atol=1e-5)
    by_id = {int(r[0].split(".")[0]): float(r[2]) for r in a[1:]}
    np.testing.assert_allclose([float(r[2]) for r in b[1:]], [by_id[i] for i in range(1, 7)], atol=1e-6)
    assert rows("tars-sub.csv") == rows("files-sub.csv")


def test_a_folder_is_walked_once_per_command(cli, head, test_dir, monkeypatch):
    from catdog_cache.sources import folder

    walks: list[Path] = []
    real = folder._walk
    monkeypatch.setattr(folder, "_walk", lambda root, skipped: walks.append(root) or real(root, skipped))
    cli("predict", test_dir)
    assert len(walks) == 2  # predict's own, passed along; and extract's, which runs only when there is work
    walks.clear()
    cli("predict", test_dir)
    cli("preview", test_dir, "--n", "2")
    assert len(walks) == 2  # cached: one walk each, decided by extract's plan read-only


def test_predict_and_preview_on_a_url(cli, head, tmp_path, photos):
    fsspec = pytest.importorskip("fsspec")
    as_files_and_shards(tmp_path, photos)
    fs = fsspec.filesystem("memory")
    for s in range(2):
        fs.pipe(f"/bucket/x-{s:06d}.tar", (tmp_path / "shards" / f"x-{s:06d}.tar").read_bytes())
    try:
        cli("predict", PATTERN, "--out", "local.csv")
        url = json.loads(cli("predict", "memory://bucket/x-{000000..000001}.tar", "--out", "url.csv", "--json").output)
        assert url["extracted"] == 6 and Path(url["cache"][0]).name.startswith("x.")
        assert rows("url.csv") == rows("local.csv")  # named by the shard's file name, the same probabilities
        assert "preview 2 images" in cli("preview", "memory://bucket/x-000001.tar", "--n", "2").output
    finally:
        fs.rm("/bucket", recursive=True)


def test_cls_members_index_a_k_class_heads_classes(cli, tmp_path):
    from tests.test_nclass import three_classes

    folder = three_classes(tmp_path / "three")
    cli("extract", folder, *TINY)
    cli("fit", "--epochs", "1")
    members = [m for c, name in enumerate(("ant", "Bee", "cow")) for i in range(4)
               for m in ((f"{c}{i}.jpg", (folder / name / f"{i}.jpg").read_bytes()), (f"{c}{i}.cls", str(c).encode()))]
    make_tar(tmp_path / "three.tar", members)
    files = json.loads(cli("predict", folder, "--out", "files.csv", "--json").output)
    tars = json.loads(cli("predict", tmp_path / "three.tar", "--out", "tars.csv", "--json").output)
    assert tars["rows"] == 12 and tars["failed"] == [] and tars["accuracy"] == files["accuracy"]
    assert rows("tars.csv")[0] == ["path", "p_ant", "p_bee", "p_cow", "label", "true_label", "log_loss"]
    assert [r[-2] for r in rows("tars.csv")[1:]] == ["ant"] * 4 + ["bee"] * 4 + ["cow"] * 4  # .cls 2 is cow


def test_same_file_follows_links_and_never_raises(tmp_path: Path) -> None:
    a = tmp_path / "a.h5"
    a.write_bytes(b"x")
    os.link(a, tmp_path / "hard.h5")
    (tmp_path / "soft.h5").symlink_to(a)
    assert same_file(a, tmp_path / "hard.h5") and same_file(tmp_path / "soft.h5", a)
    assert same_file(tmp_path / "sub" / ".." / "a.h5", a)  # spelled another way, even through a missing folder
    (tmp_path / "other.h5").write_bytes(b"x")
    assert not same_file(a, tmp_path / "other.h5") and not same_file(a, tmp_path / "missing.h5")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert not same_file(tmp_path / "loop1", a) and not same_file(a, tmp_path / "loop2")
