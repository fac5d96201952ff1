"""Every store test keeps the user cache folder (staging and read copies of store caches) in its own temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("user-cache")  # outside the test's working folder, which tests list
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder
