"""What a cache records for the next run: the files it knows, failures --strict refuses, an interruption."""

from __future__ import annotations

import json

from tests.conftest import TINY


def test_index_known_is_the_one_answer_to_which_files_are_known(cli, kaggle_dir, folder_dir):
    """extract's plan, predict's up-to-date check and scoring from a training cache share Index.known."""
    from catdog_cache.cache import read_index

    (kaggle_dir / "cat.50.jpg").write_bytes(b"not an image at all")
    cli("extract", kaggle_dir, *TINY)
    cli("extract", folder_dir)
    idx = read_index("cache/features.h5")
    known = idx.known(str(kaggle_dir.resolve()))
    assert {p.decode() for p in known} == {f"{k}.{i}.jpg" for k in ("cat", "dog") for i in range(6)} | {"cat.50.jpg"}
    assert len(idx.known(str(folder_dir.resolve()))) == 10 and idx.known("/elsewhere") == {}


def test_strict_refuses_a_failure_recorded_by_an_earlier_run(cli, kaggle_dir):
    """Resume counts a recorded failure as known, so a later --strict run on the same cache said 'failed 0' and
    exited 0 although an unusable file is still in the folder."""
    (kaggle_dir / "cat.50.jpg").write_bytes(b"not an image at all")
    cli("extract", kaggle_dir, *TINY)  # records the failure
    r = cli("extract", kaggle_dir, "--strict", ok=False)
    assert r.exit_code == 1 and "--strict" in r.output and "cat.50.jpg" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    (kaggle_dir / "cat.50.jpg").unlink()  # fixed by the user: --strict passes again
    r = cli("extract", kaggle_dir, "--strict")
    assert r.exit_code == 0, r.output


def test_interrupted_extract_is_said_by_info_and_fit(cli, kaggle_dir, monkeypatch):
    """Item 4: after Ctrl-C `info` showed "cat 4 (100%)" and fit failed without a word of the interruption."""
    import importlib

    ex = importlib.import_module("catdog_cache.extract.folder")  # the folder runner
    real = ex.run_features

    def one_batch_then_ctrl_c(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield batch
            raise KeyboardInterrupt

    monkeypatch.setattr(ex, "run_features", one_batch_then_ctrl_c)
    r = cli("extract", kaggle_dir, *TINY, "--batch-size", "4", "--workers", "0", ok=False)
    assert r.exit_code == 130
    source = str(kaggle_dir.resolve())
    info = json.loads(cli("info", "--json").output)
    assert info["cat"] == 4 and info["dog"] == 0 and info["incomplete"] == [source]
    assert "was interrupted" in cli("info").output  # (the test's own folder name holds "interrupted")
    r = cli("fit", ok=False)
    assert r.exit_code == 1 and "needs labeled cats and dogs" in r.output and "was interrupted" in r.output
    monkeypatch.setattr(ex, "run_features", real)
    cli("extract", kaggle_dir, *TINY)  # the rerun finishes the folder and clears the record
    info = json.loads(cli("info", "--json").output)
    assert info["incomplete"] == [] and info["dog"] == 6
    assert "was interrupted" not in cli("info").output
