"""The CLI's commands: help, the module entry point, help without torch, info, offline errors, a busy cache."""

import json
import subprocess
import sys

from tests.conftest import TINY


def test_help_lists_commands(cli):
    r = cli("--help")
    for cmd in ("extract", "fit", "predict", "info", "demo"):
        assert cmd in r.output


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "catdog_cache", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "extract" in r.stdout


def test_help_does_not_import_torch():
    code = "import sys; from catdog_cache import cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False"


def test_info(cli, kaggle_dir):
    r = cli("info", ok=False)
    assert r.exit_code == 1 and "no cache" in r.output
    (kaggle_dir / "cat.77.jpg").write_bytes(b"broken")
    cli("extract", kaggle_dir, *TINY)
    data = json.loads(cli("info", "--json").output)
    assert (data["rows"], data["cat"], data["dog"], data["failed"]) == (12, 6, 6, 1)
    assert data["provenance"]["weights"] == "random:seed=0" and data["size_bytes"] > 12 * 4096 * 4
    r = cli("info")
    assert "random:seed=0" in r.output and "cat.77.jpg" in r.output


def test_imagenet_offline_error_says_what_to_do(cli, kaggle_dir, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    r = cli("extract", kaggle_dir, ok=False)
    assert r.exit_code == 1
    assert "vgg16-397923af.pth" in r.output and "--weights FILE" in r.output and "Traceback" not in r.output


def test_extract_json_and_busy_cache(cli, kaggle_dir, tmp_path):
    from pathlib import Path

    from catdog_cache.cache import locked

    data = json.loads(cli("extract", kaggle_dir, *TINY, "--json").output)
    assert data["rows"] == data["found"] == data["extracted"] == 12 and data["layout"] == "kaggle"
    with locked(Path("cache/features.h5")):
        r = cli("extract", kaggle_dir, *TINY, ok=False)
    assert r.exit_code == 1 and "in use" in r.output
