"""predict and preview with `--cache s3://...` (moto's server on localhost): a store cache that holds the input
unchanged with the head's features is read through its local copy (the same predictions as from a local cache of
those features) and nothing is written to the store; one that would need rows added is refused in one line that
says to run extract into it first; the store is left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import TINY, draw, lines

pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
SMALL = ("--workers", "0", "--part-rows", "2", "--batch-size", "2")  # 6 photos -> 3 shards


def stored(bucket: str) -> dict[str, str]:
    """Every object of the bucket with its ETag: a write would add, change or remove one."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {p[len(bucket) + 1:]: str(info.get("ETag")) for p, info in fs.find(bucket, detail=True).items()}


@pytest.fixture
def trained(cli, tmp_path: Path, photos: Path, bucket: str) -> tuple[str, Path]:
    """The photos extracted into the bucket and a head fit from there (a local file)."""
    url = f"s3://{bucket}/run/features.h5"
    cli("extract", photos, "--cache", url, *TINY, *SMALL)
    head = tmp_path / "out" / "head.pt"
    cli("fit", "--cache", url, "--head", head, "--epochs", "2", "-q")
    return url, head


def test_predict_and_preview_read_a_store_cache(cli, tmp_path: Path, photos: Path, bucket: str, trained,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, head = trained
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = stored(bucket)
    r = cli("predict", photos, "--head", head, "--cache", url, "--out", tmp_path / "store.csv")
    assert "predicted 6 images" in r.output and f"features read from {url} (0 extracted now)" in r.output, r.output
    assert stored(bucket) == before  # read only: no object added, changed or removed (no lease either)

    cli("extract", photos, "--cache", tmp_path / "local.h5", *TINY, *SMALL)  # the same features, on a local disk
    cli("predict", photos, "--head", head, "--cache", tmp_path / "local.h5", "--out", tmp_path / "local.csv")
    assert (tmp_path / "store.csv").read_text() == (tmp_path / "local.csv").read_text()

    p = cli("preview", photos, "--head", head, "--cache", url, "--out", tmp_path / "grid.png", "--split", "all")
    assert "preview 6 images" in p.output and (tmp_path / "grid.png").stat().st_size > 0, p.output
    assert stored(bucket) == before
    assert os.listdir(work) == []  # nothing in the working folder (the local copy: the user cache folder)


@pytest.mark.parametrize("command", ["predict", "preview"])
def test_rows_to_add_are_refused_in_one_line(cli, tmp_path: Path, photos: Path, bucket: str, trained,
                                             command: str) -> None:
    url, head = trained
    draw(photos / "cat.9.jpg", "cat", 9)  # new since the extract: scoring would have to add its row
    before = stored(bucket)
    r = cli(command, photos, "--head", head, "--cache", url, "--out", tmp_path / "out.x", ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    text = " ".join(r.output.split())
    assert f"--cache {url}: 1 of the 7 images of {photos} are not in it" in text, text
    assert f"run `catdog-cache extract {photos} --cache {url}` first" in text, text
    assert stored(bucket) == before and not (tmp_path / "out.x").exists()

    missing = f"s3://{bucket}/nothing/features.h5"
    r = cli(command, photos, "--head", head, "--cache", missing, "--out", tmp_path / "out.x", ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    assert f"run `catdog-cache extract {photos} --cache {missing}` first" in " ".join(r.output.split()), r.output
    assert stored(bucket) == before


def test_a_store_cache_of_other_features_is_refused(cli, tmp_path: Path, photos: Path, bucket: str,
                                                    trained) -> None:
    _, head = trained
    other = f"s3://{bucket}/half/features.h5"
    cli("extract", photos, "--cache", other, *TINY, *SMALL, "--dtype", "float16")
    before = stored(bucket)
    r = cli("predict", photos, "--head", head, "--cache", other, "--out", tmp_path / "p.csv", ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    assert f"--cache {other} holds features made differently" in " ".join(r.output.split()), r.output
    assert stored(bucket) == before
