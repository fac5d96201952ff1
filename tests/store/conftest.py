"""Every store test keeps the user cache folder (staging and read copies of store caches) in its own temp folder;
the S3 tests get a local S3 API (moto's server) and a bucket on it, and drawn photos."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import draw


@pytest.fixture(autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("user-cache")  # outside the test's working folder, which tests list
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket on the local S3 API; the user cache folder (staging, read copies) under the test's folder."""
    pytest.importorskip("s3fs", reason="the [remote] extra (s3fs) is not installed")
    import fsspec.config
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       }.items():
        monkeypatch.setenv(key, value)
    # fsspec reads FSSPEC_S3_* when it is first imported; this process imported it before the test set the variable
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(3):
        draw(root / f"cat.{i}.jpg", "cat", i)
        draw(root / f"dog.{i}.jpg", "dog", 50 + i)
    old = time.time_ns() - 60 * 10**9  # a minute back: stats a rerun trusts (the local engine's racy-stat rule)
    for path in root.iterdir():
        os.utime(path, ns=(old, old))
    return root
