"""settings.py: an append takes the cache's own settings; a contradicting flag is refused."""

from __future__ import annotations

import json

from catdog_cache.cache import read_index
from tests.conftest import TINY


def test_appending_takes_the_caches_settings(cli, kaggle_dir, folder_dir, tmp_path):
    """Item 5: `extract more/ --cache lite2.h5` without the flags was refused ("this extract has vgg16")."""
    cache = tmp_path / "c.h5"
    cli("extract", kaggle_dir, *TINY, "--views", "center,flip", "--dtype", "float16", "--cache", cache)
    cli("extract", folder_dir, "--cache", cache)  # no flags: the cache's own settings
    idx = read_index(cache)
    assert len(idx.sources) == 2 and idx.shape[1] == 2 and idx.dtype == "float16"
    r = cli("extract", folder_dir, "--cache", cache, "--dtype", "float32", ok=False)  # a contradiction: refused
    assert r.exit_code == 1 and "dtype" in r.output
    cli("extract", folder_dir, "--cache", cache, "--backbone", "tiny", "--views", "center,flip")  # agreeing flags
    assert json.loads(cli("info", cache, "--json").output) == json.loads(cli("info", "--cache", cache,
                                                                              "--json").output)
