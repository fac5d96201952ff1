"""--cache as a path or an object-store URL, parsed in one place (store/url.py): a URL is never written as a local
folder named `s3:` (the old code's silent wrong result), a command that cannot use a URL refuses it in one line,
a one-slash URL is refused, a missing backend names the extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from catdog_cache.errors import InputError
from catdog_cache.store.url import StoreURL, cache_location, local_cache, store_fs
from tests.conftest import TINY, draw, lines


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(2):
        draw(root / f"cat.{i}.jpg", "cat", i)
        draw(root / f"dog.{i}.jpg", "dog", 50 + i)
    return root


def _no_scheme_folder(where: Path) -> None:
    """Nothing named like a URL's scheme (s3:, gs:, memory:) anywhere under the working folder."""
    made = [p for p in where.rglob("*") if p.name.endswith(":")]
    assert not made, made


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket/run1/features.h5", StoreURL("s3://bucket/run1/features.h5", "s3")),
    ("GS://b/f.h5", StoreURL("GS://b/f.h5", "gs")),
    ("memory://b/f.h5", StoreURL("memory://b/f.h5", "memory")),
    ("file:///tmp/x/features.h5", Path("/tmp/x/features.h5")),
    ("C://data/features.h5", Path("C://data/features.h5")),  # a drive letter is not a scheme
    ("C:\\data\\features.h5", Path("C:\\data\\features.h5")),
    ("cache/features.h5", Path("cache/features.h5")),
    ("./s3:/bucket/x.h5", Path("s3:/bucket/x.h5")),  # spelled as a path on purpose
    ("/abs/s3://x.h5", Path("/abs/s3://x.h5")),
])
def test_a_path_is_never_a_url_and_a_url_never_a_path(text: str, expected: object) -> None:
    assert cache_location(text) == expected


@pytest.mark.parametrize("value", ["s3:/bucket/run1/features.h5", Path("s3://bucket/run1/features.h5"),
                                   "gs:/b/f.h5", "s3://"])
def test_a_url_that_lost_a_slash_or_names_nothing_is_refused(value: object) -> None:
    with pytest.raises(InputError, match="--cache"):
        cache_location(value)  # type: ignore[arg-type]


def test_the_library_entry_parses_the_same_way(tmp_path: Path, photos: Path) -> None:
    """API users (engines.dispatch.extract) get the same parse: a Path that lost its `//` is not written locally."""
    from catdog_cache.backbone import WeightsSpec
    from catdog_cache.engines.dispatch import extract
    from catdog_cache.extract.config import ExtractConfig

    with pytest.raises(InputError, match="two slashes"):
        extract(photos, Path("s3://bucket/run1/features.h5"),
                ExtractConfig(weights=WeightsSpec("random"), backbone="tiny", workers=0))
    _no_scheme_folder(tmp_path)


def test_extract_into_a_url_writes_the_store_never_a_local_scheme_folder(cli, tmp_path: Path, photos: Path) -> None:
    """The issue's case (memory:// here; s3:// against a local S3 API in test_store_s3.py). The old code exited 0
    having written ./memory:/bucket/run1/features.h5 and nothing to the store."""
    fsspec = pytest.importorskip("fsspec")
    store = fsspec.filesystem("memory")
    try:
        r = cli("extract", photos, "--cache", "memory://bucket/run1/features.h5", *TINY, "--workers", "0")
        assert "extracted 4 new" in r.output and "memory://bucket/run1/features.h5" in r.output, r.output
        assert store.isfile("/bucket/run1/features.h5") and store.ls("/bucket/run1/features.h5.shards")
        _no_scheme_folder(tmp_path)
        assert not (tmp_path / "cache").exists()
    finally:
        store.rm("/bucket", recursive=True)


def test_local_cache_refuses_a_url_in_one_line_naming_what_works() -> None:
    """For a command or engine that needs a cache on a local disk (no CLI command since compact takes URLs)."""
    with pytest.raises(InputError) as e:
        local_cache("s3://b/run/features.h5", "export", "it writes next to the cache")
    text = str(e.value)
    assert "\n" not in text and "export needs a cache on a local disk (it writes next to the cache)" in text, text
    assert "s3://b/run/features.h5" in text and "give a local path" in text and "compact, info" in text, text


@pytest.mark.parametrize("flag", [True, False])
def test_compact_of_a_missing_store_cache_says_so_in_one_line(cli, tmp_path: Path, flag: bool) -> None:
    """compact takes a URL (tests/store/test_store_compact.py); one that names no cache is one line naming it."""
    pytest.importorskip("fsspec")
    url = "memory://nothing-here/run/features.h5"
    r = cli("compact", *(["--cache", url] if flag else [url]), ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    assert f"no cache at {url}" in r.output and "extract" in r.output, r.output
    _no_scheme_folder(tmp_path)


@pytest.mark.parametrize("command", ["info", "fit", "compact", "extract", "predict", "preview"])
def test_a_one_slash_url_is_refused_in_one_line(cli, tmp_path: Path, photos: Path, command: str) -> None:
    first = [photos, *TINY] if command == "extract" else [photos] if command in ("predict", "preview") else []
    argv = [command, *first, "--cache", "s3:/bucket/run1/features.h5"]
    r = cli(*argv, ok=False)
    assert r.exit_code == 1, r.output
    assert len(lines(r.output)) == 1 and "two slashes (s3://...)" in r.output, r.output
    _no_scheme_folder(tmp_path)


def test_local_cache_takes_file_urls_as_paths(tmp_path: Path) -> None:
    assert local_cache(f"file://{tmp_path}/features.h5", "compact") == tmp_path / "features.h5"


def test_a_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fsspec")
    registry = sys.modules["fsspec.registry"]  # the module (the package's `registry` attribute is its mapping)

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if gcsfs were not installed
    for name in ("gs", "gcs"):
        monkeypatch.delitem(registry._registry, name, raising=False)
    with pytest.raises(InputError, match=r"no fsspec backend for gs://.*catdog-cache\[remote\]"):
        store_fs(StoreURL("gs://b/run/features.h5", "gs"))
    with pytest.raises(InputError, match=r"no fsspec backend for nosuchscheme://.*\[remote\]"):
        store_fs(StoreURL("nosuchscheme://b/f.h5", "nosuchscheme"))


def test_without_fsspec_the_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.registry", None)
    with pytest.raises(InputError, match=r"needs fsspec: pip install 'catdog-cache\[remote\]'"):
        store_fs(StoreURL("s3://b/f.h5", "s3"))


def test_a_val_cache_url_is_refused_in_one_line(cli, tmp_path: Path, photos: Path) -> None:
    """fit --val-cache is written to: a URL there is refused, never made a local `s3:` folder."""
    r = cli("fit", "--val", photos, "--val-cache", "s3://b/run/val.h5", "--head", tmp_path / "h.pt", ok=False)
    assert r.exit_code == 1 and len(lines(r.output)) == 1, r.output
    assert "--val-cache s3://b/run/val.h5: give a local path" in r.output, r.output
    _no_scheme_folder(tmp_path)
