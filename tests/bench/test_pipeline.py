"""bench --only pipeline: extract vs the plain loop, its fresh-process measurement, the device table."""

from __future__ import annotations

from catdog_cache.bench import pipeline as benchpipe


def test_bench_pipeline_rows(tmp_path, kaggle_dir, monkeypatch):
    """The two measured modes run on the same files; the rows report ratios (the timing itself is stubbed)."""
    assert benchpipe.extract_run(kaggle_dir, "tiny", 0, 4, "cpu") == 12
    assert benchpipe.plain_loop(kaggle_dir, "tiny", 0, 4, "cpu") == 12
    photos = benchpipe.photo_like(tmp_path / "p", 3)
    assert sorted(p.name for p in photos.iterdir()) == ["cat.0.jpg", "cat.1.jpg", "dog.0.jpg"]
    monkeypatch.setattr(benchpipe, "measure", lambda mode, *a, **k: (90.0, 800.0) if mode == "extract"
                        else (100.0, 1000.0))
    rows = benchpipe.extract_vs_loop(kaggle_dir, 2, 16, lambda r: None, repeats=1)
    assert rows[0][1:] == ("90 vs 100 img/s", "0.90x; median of 1, interleaved, fresh processes")
    assert rows[1][1].startswith("800 vs 1000 us") and rows[1][2].startswith("0.80x")


def test_bench_measures_in_a_fresh_process(kaggle_dir):
    """The child process the pipeline rows time (the rows above stub it): it imports the bench by its module path,
    which a layout change broke once without any stubbed test noticing."""
    r = benchpipe.measure_run({"mode": "extract", "data_dir": str(kaggle_dir), "backbone": "tiny", "workers": 0,
                               "batch": 4, "device": "cpu"})
    assert r["n"] == 12 and r["wall"] > 0


def test_bench_only_pipeline_cli(cli, monkeypatch):
    monkeypatch.setattr(benchpipe, "measure", lambda mode, *a, **k: (50.0, 700.0))
    r = cli("bench", "--only", "pipeline", "--pipeline-images", "4", "--workers", "0", "--markdown")
    assert "extract vs plain DataLoader loop (tiny, cpu, 0 workers, batch 16, 4 files)" in r.output
    assert "| 50 vs 50 img/s | 1.00x" in r.output and "GEMM" not in r.output
    r = cli("bench", "--only", "fit", ok=False)
    assert r.exit_code == 1 and "--only: expected pipeline" in r.output


def test_device_table_runs_its_code_on_the_cpu(tmp_path):
    """The table `bench --device cuda` prints, on the CPU with the tiny backbone and a few drawn photos, in
    process: every row measured, ratios against the plain loop and the ceilings."""
    photos = benchpipe.photo_like(tmp_path / "p", 8)
    rows = benchpipe.device_table(photos, lambda r: None, device="cpu", backbones=["tiny"], workers=0, batch=4,
                                  fresh=False)
    assert len(rows) == 10 and all(value.endswith("img/s") for _, value, _ in rows)
    what = [w for w, _, _ in rows]
    assert what[:3] == ["decode ceiling: Pillow + preset, 0 workers", "decode ceiling: torchvision on cpu",
                        "model ceiling: tiny fp32"]
    assert "extract: tiny bf16 --decoder torchvision" in what
    notes = {w: n for w, _, n in rows}
    assert "x the plain loop" in notes["extract: tiny fp32 --decoder pil"] and "of min(decode" in notes[
        "extract: tiny fp32 --decoder pil"]


def test_bench_table_cli(cli, monkeypatch):
    """--table (implied by --device cuda): the rows come from device_table; a failed run is a row, not a crash."""
    def fake(spec, fresh=True):
        if spec["mode"] == "model" and spec["backbone"] == "efficientnet_lite0":
            raise RuntimeError("InputError: --backbone efficientnet_lite0 needs the lite extra")
        return {"wall": 1.0, "cpu": 0.1, "n": 10, "steady": {"extract": 90.0, "loop": 50.0}.get(spec["mode"], 100.0)}

    monkeypatch.setattr(benchpipe, "measure_run", fake)
    r = cli("bench", "--only", "pipeline", "--table", "--pipeline-images", "4", "--workers", "0", "--markdown")
    assert "| extract: vgg16 bf16 --decoder torchvision | 90 img/s | 1.80x the plain loop; 0.90 of min(decode " \
           "100, model 100) |" in r.output
    assert "model ceiling: efficientnet_lite0 fp32 | failed | RuntimeError: InputError" in r.output


def test_bench_bound_rows(tmp_path, monkeypatch):
    """bench --only bound (issue 33, item 1): per backbone and precision, extract's rate against cores / (decode +
    forward core-ms) measured in the same run, what extract's pacer chose; bf16 capability; the load average."""
    from catdog_cache.bench import bound
    from catdog_cache.extract import precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: "avx512_bf16")
    photos = benchpipe.photo_like(tmp_path / "p", 8)
    rows = bound.bound_rows(photos, lambda r: None, ["tiny"], ["fp32", "bf16"], repeats=1, fresh=False)
    what = [w for w, _, _ in rows]
    assert what == ["tiny fp32: extract vs the work bound", "tiny bf16: extract vs the work bound",
                    "bf16 on this CPU", "load average during the run"]
    value, note = rows[0][1], rows[0][2]
    rate, limit = (float(v) for v in value.removesuffix(" img/s").split(" of "))
    assert rate > 0 and limit > 0 and note.startswith(f"{rate / limit:.2f} of the bound; decode ")
    assert "extract chose " in note and "threads x " in note
    assert rows[2][1:] == ("native", "avx512_bf16 (from the CPU flags)")


def test_bench_only_bound_cli(cli, monkeypatch):
    from catdog_cache.bench import bound

    seen = {}

    def fake(data, n, log, backbones, repeats=3):
        seen.update(n=n, backbones=backbones, repeats=repeats)
        return [("tiny fp32: extract vs the work bound", "9.0 of 10.0 img/s", "0.90 of the bound")]

    monkeypatch.setattr(bound, "run", fake)
    r = cli("bench", "--only", "bound", "--backbones", "tiny", "--pipeline-images", "8", "--markdown")
    assert "| tiny fp32: extract vs the work bound | 9.0 of 10.0 img/s | 0.90 of the bound |" in r.output
    assert seen == {"n": 8, "backbones": ["tiny"], "repeats": 3}
