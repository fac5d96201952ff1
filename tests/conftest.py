"""Shared fixtures: every test works in its own temp folder, on images it draws itself, offline."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from catdog_cache.cli import app
from catdog_cache.demo import draw_animal

# The sample photos: $CATDOG_SAMPLE_DATA (a folder holding train/ and test1/), else ../shared beside the clone.
SHARED_DATA = Path(os.environ.get("CATDOG_SAMPLE_DATA") or
                   Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats")
TINY = ["--backbone", "tiny", "--weights", "random"]  # the fast 4096-d stand-in backbone


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # default cache/ paths land in the test's folder
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # never the user's weights cache


def draw(path: Path, kind: str, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_animal(kind, random.Random(seed), size=96).save(path, quality=90)
    return path


def class_folder(root: Path, per_class: int, broken: bool = True) -> Path:
    """cat/ and dog/ with `per_class` drawn photos each, and one undecodable dog/broken.jpg when `broken`."""
    for i in range(per_class):
        draw(root / "cat" / f"{i}.jpg", "cat", i)
        draw(root / "dog" / f"{i}.jpg", "dog", 500 + i)
    if broken:
        (root / "dog" / "broken.jpg").write_bytes(b"no")
    return root


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """Kaggle-flat: cat.N.jpg / dog.N.jpg, 6 of each."""
    root = tmp_path / "kaggle"
    for i in range(6):
        draw(root / f"cat.{i}.jpg", "cat", i)
        draw(root / f"dog.{i}.jpg", "dog", 100 + i)
    return root


@pytest.fixture
def folder_dir(tmp_path: Path) -> Path:
    """ImageFolder: Cat/ and dog/ (mixed case on purpose), 5 of each."""
    root = tmp_path / "folder"
    for i in range(5):
        draw(root / "Cat" / f"{i}.jpg", "cat", 200 + i)
        draw(root / "dog" / f"{i}.png", "dog", 300 + i)
    return root


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    """Unlabeled, numeric names like Kaggle's test1."""
    root = tmp_path / "test1"
    for i in range(1, 5):
        draw(root / f"{i}.jpg", "cat" if i % 2 else "dog", 400 + i)
    return root


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, [str(a) for a in args])
        if ok and result.exit_code != 0:
            raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.exception!r}")
        return result

    return invoke


def jpeg(kind: str, seed: int, tmp: Path) -> bytes:
    return draw(tmp / f"{kind}-{seed}.jpg", kind, seed).read_bytes()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, bytes]:
    """Kaggle names -> JPEG bytes, 4 cats and 4 dogs (tar shards' members)."""
    return {f"{kind}.{i}.jpg": jpeg(kind, 10 * i + (kind == "dog"), tmp_path / "drawn")
            for i in range(4) for kind in ("cat", "dog")}


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every shard the tar reader opens (workers=0: the reader runs in this process)."""
    from catdog_cache.sources import tars

    seen: list[str] = []
    real = tars.open_tar

    def spy(source: str):
        seen.append(source)
        return real(source)

    monkeypatch.setattr(tars, "open_tar", spy)
    return seen


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def png_ok(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.fixture
def trained(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "3", "--calibrate")
    return kaggle_dir
