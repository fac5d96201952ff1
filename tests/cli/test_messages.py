"""What the CLI says: help, progress lines, summaries, and one-line errors that say what to change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY, lines


def test_help_shows_flags_as_flags_and_usage_names(cli):
    for cmd in ("fit", "extract", "predict", "verify"):
        r = cli(cmd, "--help")
        assert "<bool>" not in r.output and "--json" in r.output or cmd == "verify"
    assert "INPUT" in cli("extract", "--help").output and "{data_dir}" not in cli("extract", "--help").output
    assert "DATA_DIR" in cli("predict", "--help").output and "{data_dir}" not in cli("predict", "--help").output
    r = cli("fit", "--json", "true", ok=False)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) <= 4  # typer's usage error, short
    assert "[default: 128]" in cli("verify", "--help").output  # the same batch size as fit
    assert cli("--version").output.startswith("catdog-cache ")


def test_logs_get_progress_lines_with_rate_and_eta(cli, kaggle_dir, test_dir, monkeypatch):
    """Item 3: `extract ... > log 2>&1` stayed silent for minutes. CliRunner's stderr is no terminal."""
    from catdog_cache.cli import Bar

    monkeypatch.setattr(Bar, "log_seconds", 0.0)  # a line per callback
    r = cli("extract", kaggle_dir, *TINY, "--batch-size", "4", "--workers", "0")
    progress = [line for line in lines(r.output) if line.startswith("extract ")]
    assert "extract 4/12 (33%)" in progress[0] and progress[-1].startswith("extract 12/12 (100%)"), r.output
    assert any("img/s, ETA " in line for line in progress)
    r = cli("fit", "--epochs", "3")
    assert "fit 3/3 (100%)" in r.output
    r = cli("predict", test_dir, "--batch-size", "2", "--workers", "0")
    assert "predict 2/4 (50%)" in r.output
    assert "predict 2/4" not in cli("predict", test_dir, "-q").output  # --quiet stays quiet
    monkeypatch.setattr(Bar, "log_seconds", 3600.0)  # a short run in a log: no progress lines at all
    r = cli("extract", kaggle_dir, *TINY, "--cache", "other.h5")
    assert not [line for line in lines(r.output) if line.startswith("extract ")]


def test_quiet_fit_still_prints_its_summary_and_no_val_split_prints_no_nan(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    r = cli("fit", "--epochs", "1", "-q")
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "validation accuracy" in lines[0] and "log loss" in lines[0]
    r = cli("fit", "--epochs", "2", "--val-fraction", "0")
    assert "nan" not in r.output.lower() and "no validation split" in r.output and "1 epoch" not in r.output
    assert "2 epochs" in r.output
    r = cli("fit", "--epochs", "1")
    assert "1 epoch " in r.output and "1 epochs" not in r.output  # plurals


def test_empty_cache_says_empty(cli, kaggle_dir):
    from catdog_cache.backbone import IMAGENET
    from catdog_cache.cache import Provenance, assemble

    prov = Provenance("tiny", "fc7", "random:seed=0", IMAGENET.spec(), "center", "float32", "fp32")
    assemble(Path("cache/features.h5"), prov, {})
    r = cli("fit", ok=False)
    assert r.exit_code == 1 and "is empty" in r.output


def test_options_checked_even_with_nothing_to_do(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    for args, word in ((["--device", "gpu"], "--device"), (["--workers", "-5"], "--workers")):
        r = cli("extract", kaggle_dir, *TINY, *args, ok=False)
        assert r.exit_code == 1 and word in r.output
    cli("fit", "--epochs", "1")
    (Path("w.pth")).write_bytes(b"x")
    r = cli("predict", kaggle_dir, "--weights", "w.pth", ok=False)
    assert r.exit_code == 1 and "drop --weights" in r.output


def test_logs_get_one_line_per_message():
    """Not a terminal: no wrapping at 80 columns, no blank line before an error."""
    long_dir = "x" * 150
    r = subprocess.run([sys.executable, "-m", "catdog_cache", "fit", "--cache", f"{long_dir}/f.h5"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert long_dir in r.stderr


def test_info_on_a_head_says_it_is_a_head(cli, kaggle_dir):
    """Item 4: `info --cache x.head.pt` advised deleting a good head."""
    cli("extract", kaggle_dir, *TINY)
    cli("fit", "--epochs", "1")
    r = cli("fit", "--cache", "cache/features.head.pt", ok=False)
    assert r.exit_code == 1 and "--head" in r.output and "delete" not in r.output, r.output
    for args in (("info", "--cache", "cache/features.head.pt"), ("info", "cache/features.head.pt")):
        r = cli(*args)  # issue 31, item 11: info describes a head (tests/cli/test_new_user_round3.py)
        assert "a head, written by fit" in r.output and "delete" not in r.output, r.output
        assert str(Path("cache/features.h5").resolve()) in r.output.replace("\n", "")


def test_info_json_transform_is_an_object(cli, kaggle_dir):
    cli("extract", kaggle_dir, *TINY)
    data = json.loads(cli("info", "--json").output)
    assert isinstance(data["provenance"]["transform"], dict) and data["provenance"]["transform"]["crop"] == 224
    assert data["dim"] == 4096


def test_many_sources_are_summarised_not_listed(cli, tmp_path):
    """A cache of thousands of tar shards has as many sources: info's table and fit's summary line name a few and
    count the rest (info lists 10, fit 5); --json keeps every one."""
    import numpy as np

    from catdog_cache.cache import Rows, finish, write_part
    from tests.fit.test_fit import PROV

    rng = np.random.default_rng(0)
    for j in range(12):
        y = np.arange(8) % 2
        x = rng.normal(0, 1, (8, 1, 16)).astype(np.float32) + y[:, None, None]
        write_part(tmp_path / "c.h5", f"part-{j:09d}-0-000000", PROV, f"/data/train-{j:06d}.tar",
                   Rows(features=list(x), paths=[f"k{i}".encode() for i in range(8)], labels=y.tolist(),
                        sha256=[f"{j:032x}{i:032x}" for i in range(8)]), {}, (1, 16))
    finish(tmp_path / "c.h5", PROV, {}, dim=16)
    r = cli("info", "--cache", tmp_path / "c.h5")
    assert "train-000009.tar" in r.output and "train-000010.tar" not in r.output and "and 2 more" in r.output
    assert len(json.loads(cli("info", "--cache", tmp_path / "c.h5", "--json").output)["sources"]) == 12
    r = cli("fit", "--cache", tmp_path / "c.h5", "--epochs", "1", "--quiet")
    assert "from 12 shards: /data/train-000000.tar," in r.output and "and 7 more" in r.output
    assert "train-000005.tar" not in r.output


def test_os_errors_say_what_to_change(cli, kaggle_dir, tmp_path):
    """An OSError names a file the user may never have named (the cache's lock, a head's temp file): the line also
    says what to change."""
    (tmp_path / "afile").write_text("x")
    r = cli("extract", kaggle_dir, *TINY, "--cache", tmp_path / "afile" / "f.h5", ok=False)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output
    assert "afile" in lines[0] and "give another path" in lines[0]


def test_an_unquoted_pattern_gets_a_hint(cli, tmp_path):
    """bash expands an unquoted shards/train-{000000..000001}.tar into two words: one line saying to quote it."""
    r = cli("extract", tmp_path / "train-000000.tar", tmp_path / "train-000001.tar", ok=False)
    assert r.exit_code == 1 and "quote the brace pattern" in r.output and len(r.output.strip().splitlines()) == 1
    r = cli("extract", tmp_path / "a", tmp_path / "b", ok=False)
    assert r.exit_code == 1 and "extract each folder in its own run" in r.output
