"""demo: runs offline on drawn photos, and never deletes a folder it did not make."""

from __future__ import annotations


def test_demo_runs_offline(cli, tmp_path):
    r = cli("demo", "--backbone", "tiny", "--epochs", "3")
    assert "random weights" in r.output and "extract" in r.output and "predict" in r.output
    demo = tmp_path / "cache" / "demo"
    assert all((demo / name).is_file() for name in ("submission.csv", "preview.png", "features-tiny-random.head.png"))
    r = cli("demo", "--backbone", "tiny", "--epochs", "1")  # its own folder: reused, nothing deleted
    assert "0 images ->" in r.output or "reused" in r.output or r.exit_code == 0


def test_demo_never_deletes_a_folder_it_did_not_make(cli, tmp_path):
    mine = tmp_path / "precious"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "thesis.txt").write_text("years of work")
    r = cli("demo", "--backbone", "tiny", "--folder", mine, ok=False)
    assert r.exit_code == 1 and "not made by the demo" in r.output
    assert (mine / "sub" / "thesis.txt").read_text() == "years of work" and sorted(p.name for p in mine.iterdir()) \
        == ["sub"]
