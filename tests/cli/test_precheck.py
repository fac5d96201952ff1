"""The mistakes the CLI answers before importing torch, in the words the core functions use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


HARNESS = """
import contextlib, io, json, sys
from catdog_cache.cli import main

results = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["catdog-cache", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def run_cli_without_torch(tmp_path: Path, *commands: list[str]) -> list[dict]:
    """Each command through the CLI's main in one fresh interpreter; whether torch was imported after each."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(list(commands))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_listing_and_argument_mistakes_answer_without_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = run_cli_without_torch(tmp_path, ["backbones", "--json"], ["extract", "x", "--backbone", "nope"],
                              ["extract", "empty", "--backbone", "resnet5"], ["extract", "x"],
                              ["fit", "--cache", "missing.h5"], ["fit", "--cache", "missing.h5", "--epochs", "0"],
                              ["predict", "x", "--head", "missing.pt"], ["predict", "empty", "--head", "missing.pt"],
                              ["extract", "empty", "--backbone", "vgg16", "--layer", "fc9"])
    assert [x["torch"] for x in r] == [False] * len(r), [x["err"] for x in r]
    listing = {row["backbone"]: row for row in json.loads(r[0]["out"])}
    assert r[0]["code"] == 0 and listing["vgg16"]["dim"] == 4096 and listing["efficientnet_lite0"]["dim"] == 1280
    assert listing["resnet50"]["gflops"] == pytest.approx(8.17, abs=0.01)
    assert [x["code"] for x in r[1:]] == [1] * (len(r) - 1)
    assert "--backbone 'nope': unknown" in r[1]["err"]
    assert "Did you mean resnet50?" in r[2]["err"]  # the hint's names come from torchvision's source, not its import
    assert "folder not found: x" in r[3]["err"]
    assert "no cache at missing.h5" in r[4]["err"]
    assert "--epochs must be at least 1" in r[5]["err"]
    assert "folder not found: x" in r[6]["err"]
    assert "no head at missing.pt" in r[7]["err"]
    assert "--layer 'fc9'" in r[8]["err"]


def test_early_head_check_says_what_load_head_says(tmp_path: Path) -> None:
    from catdog_cache.cli.precheck import head_file
    from catdog_cache.errors import CacheError
    from catdog_cache.fit.head import load_head

    for path in (tmp_path / "missing.pt", tmp_path):
        with pytest.raises(CacheError) as early:
            head_file(path)
        with pytest.raises(CacheError) as core:
            load_head(path)
        assert str(early.value) == str(core.value)
